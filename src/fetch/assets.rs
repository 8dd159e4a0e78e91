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
    /// SHA-256, the whole digest.
    Sha256(&'static str),
    /// The start of a SHA-256 digest: the 8 hex digits torchvision puts in its weight files'
    /// names (`resnet18-f37072fd.pth`), all that its `check_hash` verifies, where we know
    /// no more of the digest. 32 bits: it catches a damaged or wrong file, not a forged one.
    Sha256Prefix(&'static str),
}

impl Checksum {
    /// The algorithm's name, as in messages: `"md5"` or `"sha256"`.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5",
            Checksum::Sha256(_) | Checksum::Sha256Prefix(_) => "sha256",
        }
    }

    /// The expected digest in hex (only its start for [`Checksum::Sha256Prefix`]).
    pub fn expected(&self) -> &'static str {
        match self {
            Checksum::Md5(h) | Checksum::Sha256(h) | Checksum::Sha256Prefix(h) => h,
        }
    }

    /// True when the whole digest is known, not only its start.
    pub fn is_full(&self) -> bool {
        !matches!(self, Checksum::Sha256Prefix(_))
    }

    /// What the digest must be, for messages: the hex, or "one starting with `<hex>`".
    pub fn expectation(&self) -> String {
        match self {
            Checksum::Sha256Prefix(h) => format!("one starting with {h}"),
            _ => self.expected().to_string(),
        }
    }

    /// The coreutils command that prints this digest, for the manual steps.
    pub(super) fn tool(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5sum",
            Checksum::Sha256(_) | Checksum::Sha256Prefix(_) => "sha256sum",
        }
    }

    pub(super) fn matches(&self, got: &str) -> bool {
        match self {
            Checksum::Sha256Prefix(prefix) => {
                // An empty prefix would verify nothing: it never matches.
                !prefix.is_empty()
                    && got
                        .get(..prefix.len())
                        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
            }
            _ => self.expected().eq_ignore_ascii_case(got),
        }
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

/// Which of torchvision's pretrained weights of an architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightsVersion {
    /// `IMAGENET1K_V1`: the original training recipe (the course script's
    /// `pretrained=True`); every architecture has it.
    V1,
    /// `IMAGENET1K_V2`: torchvision's improved recipe; ResNet-50/101/152 and the wide
    /// ResNets only.
    V2,
}

impl WeightsVersion {
    /// `"v1"` or `"v2"`.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightsVersion::V1 => "v1",
            WeightsVersion::V2 => "v2",
        }
    }

    /// torchvision's name, `IMAGENET1K_V1` or `IMAGENET1K_V2`.
    pub fn torchvision_name(self) -> &'static str {
        match self {
            WeightsVersion::V1 => "IMAGENET1K_V1",
            WeightsVersion::V2 => "IMAGENET1K_V2",
        }
    }
}

impl std::fmt::Display for WeightsVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The file format of downloadable weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightsFormat {
    /// torchvision's own `.pth`, from download.pytorch.org, checksummed.
    Pth,
    /// The same weights as `.safetensors` from Hugging Face's `timm/<arch>.tv_in1k` (V1) or
    /// `timm/<arch>.tv2_in1k` (V2), same tensor names; no digest pinned, not verified.
    Safetensors,
}

/// One downloadable set of pretrained backbone weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PretrainedWeights {
    /// The architecture's torchvision name, e.g. `resnet18`
    /// ([`crate::backbone::arch::Arch::name`]).
    pub backbone: &'static str,
    /// V1 or V2.
    pub version: WeightsVersion,
    /// `.pth` or `.safetensors`.
    pub format: WeightsFormat,
    /// Where it comes from and how it is verified.
    pub asset: Asset,
}

/// A torchvision `.pth` of `backbone`, `file` under `/models/`.
const fn torchvision(
    backbone: &'static str,
    version: WeightsVersion,
    name: &'static str,
    file: &'static str,
    url_path: &'static str,
    checksum: Checksum,
) -> PretrainedWeights {
    PretrainedWeights {
        backbone,
        version,
        format: WeightsFormat::Pth,
        asset: Asset {
            name,
            file_name: file,
            url_path,
            source: Source::Weights,
            checksum: Some(checksum),
            size: None,
        },
    }
}

/// timm's safetensors copy of a torchvision weights file, from Hugging Face.
const fn timm(
    backbone: &'static str,
    version: WeightsVersion,
    name: &'static str,
    file: &'static str,
    url_path: &'static str,
) -> PretrainedWeights {
    PretrainedWeights {
        backbone,
        version,
        format: WeightsFormat::Safetensors,
        asset: Asset {
            name,
            file_name: file,
            url_path,
            source: Source::HuggingFace,
            checksum: None,
            size: None,
        },
    }
}

use WeightsVersion::{V1, V2};

/// Every pretrained ResNet this tool can download: torchvision's `IMAGENET1K_V1` and
/// `IMAGENET1K_V2` `.pth` files (the list in torchvision's `models/resnet.py`) and timm's
/// safetensors copies of them. The `.pth` files of ResNet-50 are checked against their whole
/// sha256; the others against the sha256 prefix in their names ([`Checksum::Sha256Prefix`],
/// what torchvision itself verifies), as their whole digests are not published.
pub const PRETRAINED: [PretrainedWeights; 24] = [
    torchvision(
        "resnet18",
        V1,
        "ResNet-18 IMAGENET1K_V1 weights (torchvision)",
        "resnet18-f37072fd.pth",
        "/models/resnet18-f37072fd.pth",
        Checksum::Sha256Prefix("f37072fd"),
    ),
    torchvision(
        "resnet34",
        V1,
        "ResNet-34 IMAGENET1K_V1 weights (torchvision)",
        "resnet34-b627a593.pth",
        "/models/resnet34-b627a593.pth",
        Checksum::Sha256Prefix("b627a593"),
    ),
    PretrainedWeights {
        backbone: "resnet50",
        version: V1,
        format: WeightsFormat::Pth,
        asset: RESNET50_V1,
    },
    PretrainedWeights {
        backbone: "resnet50",
        version: V2,
        format: WeightsFormat::Pth,
        asset: RESNET50_V2,
    },
    torchvision(
        "resnet101",
        V1,
        "ResNet-101 IMAGENET1K_V1 weights (torchvision)",
        "resnet101-63fe2227.pth",
        "/models/resnet101-63fe2227.pth",
        Checksum::Sha256Prefix("63fe2227"),
    ),
    torchvision(
        "resnet101",
        V2,
        "ResNet-101 IMAGENET1K_V2 weights (torchvision)",
        "resnet101-cd907fc2.pth",
        "/models/resnet101-cd907fc2.pth",
        Checksum::Sha256Prefix("cd907fc2"),
    ),
    torchvision(
        "resnet152",
        V1,
        "ResNet-152 IMAGENET1K_V1 weights (torchvision)",
        "resnet152-394f9c45.pth",
        "/models/resnet152-394f9c45.pth",
        Checksum::Sha256Prefix("394f9c45"),
    ),
    torchvision(
        "resnet152",
        V2,
        "ResNet-152 IMAGENET1K_V2 weights (torchvision)",
        "resnet152-f82ba261.pth",
        "/models/resnet152-f82ba261.pth",
        Checksum::Sha256Prefix("f82ba261"),
    ),
    torchvision(
        "wide_resnet50_2",
        V1,
        "Wide ResNet-50-2 IMAGENET1K_V1 weights (torchvision; stored as float16)",
        "wide_resnet50_2-95faca4d.pth",
        "/models/wide_resnet50_2-95faca4d.pth",
        Checksum::Sha256Prefix("95faca4d"),
    ),
    torchvision(
        "wide_resnet50_2",
        V2,
        "Wide ResNet-50-2 IMAGENET1K_V2 weights (torchvision)",
        "wide_resnet50_2-9ba9bcbe.pth",
        "/models/wide_resnet50_2-9ba9bcbe.pth",
        Checksum::Sha256Prefix("9ba9bcbe"),
    ),
    torchvision(
        "wide_resnet101_2",
        V1,
        "Wide ResNet-101-2 IMAGENET1K_V1 weights (torchvision; stored as float16)",
        "wide_resnet101_2-32ee1156.pth",
        "/models/wide_resnet101_2-32ee1156.pth",
        Checksum::Sha256Prefix("32ee1156"),
    ),
    torchvision(
        "wide_resnet101_2",
        V2,
        "Wide ResNet-101-2 IMAGENET1K_V2 weights (torchvision)",
        "wide_resnet101_2-d733dc28.pth",
        "/models/wide_resnet101_2-d733dc28.pth",
        Checksum::Sha256Prefix("d733dc28"),
    ),
    timm(
        "resnet18",
        V1,
        "ResNet-18 IMAGENET1K_V1 weights as safetensors (timm/resnet18.tv_in1k)",
        "resnet18.tv_in1k.safetensors",
        "/timm/resnet18.tv_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "resnet34",
        V1,
        "ResNet-34 IMAGENET1K_V1 weights as safetensors (timm/resnet34.tv_in1k)",
        "resnet34.tv_in1k.safetensors",
        "/timm/resnet34.tv_in1k/resolve/main/model.safetensors",
    ),
    PretrainedWeights {
        backbone: "resnet50",
        version: V1,
        format: WeightsFormat::Safetensors,
        asset: RESNET50_V1_SAFETENSORS,
    },
    timm(
        "resnet50",
        V2,
        "ResNet-50 IMAGENET1K_V2 weights as safetensors (timm/resnet50.tv2_in1k)",
        "resnet50.tv2_in1k.safetensors",
        "/timm/resnet50.tv2_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "resnet101",
        V1,
        "ResNet-101 IMAGENET1K_V1 weights as safetensors (timm/resnet101.tv_in1k)",
        "resnet101.tv_in1k.safetensors",
        "/timm/resnet101.tv_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "resnet101",
        V2,
        "ResNet-101 IMAGENET1K_V2 weights as safetensors (timm/resnet101.tv2_in1k)",
        "resnet101.tv2_in1k.safetensors",
        "/timm/resnet101.tv2_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "resnet152",
        V1,
        "ResNet-152 IMAGENET1K_V1 weights as safetensors (timm/resnet152.tv_in1k)",
        "resnet152.tv_in1k.safetensors",
        "/timm/resnet152.tv_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "resnet152",
        V2,
        "ResNet-152 IMAGENET1K_V2 weights as safetensors (timm/resnet152.tv2_in1k)",
        "resnet152.tv2_in1k.safetensors",
        "/timm/resnet152.tv2_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "wide_resnet50_2",
        V1,
        "Wide ResNet-50-2 IMAGENET1K_V1 weights as safetensors (timm/wide_resnet50_2.tv_in1k)",
        "wide_resnet50_2.tv_in1k.safetensors",
        "/timm/wide_resnet50_2.tv_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "wide_resnet50_2",
        V2,
        "Wide ResNet-50-2 IMAGENET1K_V2 weights as safetensors (timm/wide_resnet50_2.tv2_in1k)",
        "wide_resnet50_2.tv2_in1k.safetensors",
        "/timm/wide_resnet50_2.tv2_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "wide_resnet101_2",
        V1,
        "Wide ResNet-101-2 IMAGENET1K_V1 weights as safetensors (timm/wide_resnet101_2.tv_in1k)",
        "wide_resnet101_2.tv_in1k.safetensors",
        "/timm/wide_resnet101_2.tv_in1k/resolve/main/model.safetensors",
    ),
    timm(
        "wide_resnet101_2",
        V2,
        "Wide ResNet-101-2 IMAGENET1K_V2 weights as safetensors (timm/wide_resnet101_2.tv2_in1k)",
        "wide_resnet101_2.tv2_in1k.safetensors",
        "/timm/wide_resnet101_2.tv2_in1k/resolve/main/model.safetensors",
    ),
];

/// The downloadable weights of `backbone` (torchvision's name) in `version` and `format`;
/// `None` where torchvision has none (ResNet-18/34 have no V2).
pub fn pretrained(
    backbone: &str,
    version: WeightsVersion,
    format: WeightsFormat,
) -> Option<&'static Asset> {
    PRETRAINED
        .iter()
        .find(|w| w.backbone == backbone && w.version == version && w.format == format)
        .map(|w| &w.asset)
}

/// The architectures that have weights of `version` (all for V1).
pub fn backbones_with(version: WeightsVersion) -> Vec<&'static str> {
    PRETRAINED
        .iter()
        .filter(|w| w.version == version && w.format == WeightsFormat::Pth)
        .map(|w| w.backbone)
        .collect()
}
