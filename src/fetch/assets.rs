//! What can be downloaded: the files of each asset, where they come from and the checksum
//! they must have.

use super::*;

/// Directory that the CIFAR-10 binary archive unpacks to, inside the data directory.
pub const CIFAR10_BIN_DIR: &str = "cifar-10-batches-bin";

/// The files that a complete `cifar-10-batches-bin/` holds.
pub const CIFAR10_BIN_FILES: [&str; 7] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "batches.meta.txt",
];

/// Directory that the CIFAR-100 binary archive unpacks to, inside the data directory.
pub const CIFAR100_BIN_DIR: &str = "cifar-100-binary";

/// The files that a complete `cifar-100-binary/` holds.
pub const CIFAR100_BIN_FILES: [&str; 4] = [
    "train.bin",
    "test.bin",
    "coarse_label_names.txt",
    "fine_label_names.txt",
];

/// Environment variable overriding [`DownloadOptions::cifar_base_url`].
pub const ENV_CIFAR_URL: &str = "CIFAR_FINETUNE_CIFAR_URL";
/// Environment variable overriding [`DownloadOptions::weights_base_url`].
pub const ENV_WEIGHTS_URL: &str = "CIFAR_FINETUNE_WEIGHTS_URL";
/// Environment variable overriding [`DownloadOptions::hf_base_url`].
pub const ENV_HF_URL: &str = "CIFAR_FINETUNE_HF_URL";

/// Default host of the CIFAR-10 and CIFAR-100 archives (Alex Krizhevsky's page at the
/// University of Toronto).
pub const DEFAULT_CIFAR_BASE_URL: &str = "https://www.cs.toronto.edu";
/// Default host of torchvision's pretrained weights.
pub const DEFAULT_WEIGHTS_BASE_URL: &str = "https://download.pytorch.org";
/// Default Hugging Face host.
pub const DEFAULT_HF_BASE_URL: &str = "https://huggingface.co";

/// Which configured base URL an [`Asset`] is fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// [`DownloadOptions::cifar_base_url`].
    Cifar,
    /// [`DownloadOptions::weights_base_url`].
    Weights,
    /// [`DownloadOptions::hf_base_url`].
    HuggingFace,
}

/// An expected digest, as lowercase hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// MD5, the digest the CIFAR authors publish.
    Md5(&'static str),
    /// SHA-256; torchvision's file names embed its first 8 hex digits.
    Sha256(&'static str),
}

impl Checksum {
    /// The algorithm's name, as in messages: `"md5"` or `"sha256"`.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5",
            Checksum::Sha256(_) => "sha256",
        }
    }

    /// The expected digest in hex.
    pub fn expected(&self) -> &'static str {
        match self {
            Checksum::Md5(h) | Checksum::Sha256(h) => h,
        }
    }

    /// The coreutils command that prints this digest, for the manual steps.
    pub(super) fn tool(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5sum",
            Checksum::Sha256(_) => "sha256sum",
        }
    }

    pub(super) fn matches(&self, got: &str) -> bool {
        self.expected().eq_ignore_ascii_case(got)
    }
}

/// A file this tool knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Human-readable name, used in messages.
    pub name: &'static str,
    /// Name of the file inside the data directory.
    pub file_name: &'static str,
    /// Path on the server, appended to the base URL of [`Asset::source`].
    pub url_path: &'static str,
    /// Which base URL serves this asset.
    pub source: Source,
    /// Expected digest; `None` when no digest is pinned, and then nothing is verified (the
    /// messages say so).
    pub checksum: Option<Checksum>,
    /// Expected size in bytes, when known: a progress total before the server answers, and a
    /// bound on how much a server may send.
    pub size: Option<u64>,
}

impl Asset {
    /// The full URL of this asset under the base URLs of `opts`.
    pub fn url(&self, opts: &DownloadOptions) -> String {
        join_url(opts.base_url(self.source), self.url_path)
    }
}

/// CIFAR-10, binary version (the format `data::cifar` reads).
pub const CIFAR10_BINARY: Asset = Asset {
    name: "CIFAR-10 (binary version)",
    file_name: "cifar-10-binary.tar.gz",
    url_path: "/~kriz/cifar-10-binary.tar.gz",
    source: Source::Cifar,
    checksum: Some(Checksum::Md5("c32a1d4ab5d03f1284b67883e8d87530")),
    size: Some(170_052_171),
};

/// CIFAR-100, binary version (the format `data::cifar100` reads).
///
/// The md5 is the one the dataset page lists for "CIFAR-100 binary version (suitable for C
/// programs)" (<https://www.cs.toronto.edu/~kriz/cifar.html>, whose md5 for the python
/// version, eb9058c3a382ffc7106e4002c42a8d85, is also torchvision's `CIFAR100.tgz_md5`);
/// the size, 168,513,733 bytes, is the "161 MB" of that page to the byte, as other
/// downloaders of this archive pin it.
pub const CIFAR100_BINARY: Asset = Asset {
    name: "CIFAR-100 (binary version)",
    file_name: "cifar-100-binary.tar.gz",
    url_path: "/~kriz/cifar-100-binary.tar.gz",
    source: Source::Cifar,
    checksum: Some(Checksum::Md5("03b5dce01913d631647c71ecec9e9cb8")),
    size: Some(168_513_733),
};

/// torchvision's ResNet-50 `IMAGENET1K_V1` weights: the original script's `pretrained=True`
/// and our default.
pub const RESNET50_V1: Asset = Asset {
    name: "ResNet-50 IMAGENET1K_V1 weights (torchvision)",
    file_name: "resnet50-0676ba61.pth",
    url_path: "/models/resnet50-0676ba61.pth",
    source: Source::Weights,
    checksum: Some(Checksum::Sha256(
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
    )),
    size: None,
};

/// torchvision's ResNet-50 `IMAGENET1K_V2` weights (the improved training recipe).
pub const RESNET50_V2: Asset = Asset {
    name: "ResNet-50 IMAGENET1K_V2 weights (torchvision)",
    file_name: "resnet50-11ad3fa6.pth",
    url_path: "/models/resnet50-11ad3fa6.pth",
    source: Source::Weights,
    checksum: Some(Checksum::Sha256(
        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
    )),
    size: None,
};

/// The `IMAGENET1K_V1` weights as safetensors, from Hugging Face's `timm/resnet50.tv_in1k`
/// (same tensor names as torchvision). No digest is pinned for this file, so it is not
/// verified; the strict weight loader still checks every tensor name and shape.
pub const RESNET50_V1_SAFETENSORS: Asset = Asset {
    name: "ResNet-50 IMAGENET1K_V1 weights as safetensors (timm/resnet50.tv_in1k)",
    file_name: "resnet50.tv_in1k.safetensors",
    url_path: "/timm/resnet50.tv_in1k/resolve/main/model.safetensors",
    source: Source::HuggingFace,
    checksum: None,
    size: None,
};
