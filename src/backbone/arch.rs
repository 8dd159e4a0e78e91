//! The backbone seam: one description of a torchvision ResNet ([`Arch`]: block kind, depths,
//! widths, and the feature size that follows from them) that the strict key list
//! ([`Arch::keys`]), the candle reference ([`super::resnet`]) and the fast path
//! ([`super::fast`]) are all built from, so ResNet-18/34/50/101/152 and the wide variants are
//! data, not code paths.
//!
//! The layout is torchvision's (`torchvision/models/resnet.py`, "ResNet v1.5"): a 7×7
//! stride-2 stem and a 3×3 max pool, then four stages of blocks whose first block halves the
//! resolution (stages 2-4) — on the 3×3 convolution of a bottleneck, on the first 3×3 of a
//! basic block — and gets a 1×1 projection shortcut (`downsample`) whenever its stride or
//! width changes.

use std::fmt;

/// The residual block a ResNet is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18, -34); output width = the stage's width.
    Basic,
    /// 1×1 reduce, 3×3, 1×1 expand (ResNet-50 and deeper); output width = 4 × the stage's.
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of stage width (torchvision's `expansion`).
    pub const fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// A convolution and the batch norm after it, as torchvision names and shapes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSpec {
    /// Key prefix of the convolution, e.g. `layer2.0.conv2`.
    pub conv: String,
    /// Key prefix of its batch norm, e.g. `layer2.0.bn2`.
    pub bn: String,
    /// Weight shape `[out, in, k, k]`.
    pub shape: [usize; 4],
    /// Stride (the padding is `k / 2`).
    pub stride: usize,
}

/// One residual block: `relu(main(x) + shortcut(x))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    /// The main path in order: a ReLU follows every convolution but the last, whose output
    /// is added to the shortcut before the block's ReLU. Two for a basic block, three for a
    /// bottleneck.
    pub main: Vec<ConvSpec>,
    /// The strided 1×1 projection of the shortcut, where the block changes the stride or
    /// the width; `None` means the shortcut is the input itself.
    pub downsample: Option<ConvSpec>,
}

/// A torchvision ResNet up to its global average pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    /// torchvision's builder name, e.g. `resnet50`.
    pub name: &'static str,
    /// The name people write, e.g. `ResNet-50`, `Wide ResNet-50-2`.
    pub title: &'static str,
    /// The block every stage is made of.
    pub block: BlockKind,
    /// Blocks per stage.
    pub depths: [usize; 4],
    /// torchvision's `width_per_group`: 64, or 128 for the wide variants (which widen the
    /// bottlenecks' inner convolutions only).
    pub width_per_group: usize,
}

/// Stage widths (torchvision's `planes`) of every ResNet.
const PLANES: [usize; 4] = [64, 128, 256, 512];

impl Arch {
    /// ResNet-18.
    pub const RESNET18: Arch =
        Arch::new("resnet18", "ResNet-18", BlockKind::Basic, [2, 2, 2, 2], 64);
    /// ResNet-34.
    pub const RESNET34: Arch =
        Arch::new("resnet34", "ResNet-34", BlockKind::Basic, [3, 4, 6, 3], 64);
    /// ResNet-50, the default backbone.
    pub const RESNET50: Arch = Arch::new(
        "resnet50",
        "ResNet-50",
        BlockKind::Bottleneck,
        [3, 4, 6, 3],
        64,
    );
    /// ResNet-101.
    pub const RESNET101: Arch = Arch::new(
        "resnet101",
        "ResNet-101",
        BlockKind::Bottleneck,
        [3, 4, 23, 3],
        64,
    );
    /// ResNet-152.
    pub const RESNET152: Arch = Arch::new(
        "resnet152",
        "ResNet-152",
        BlockKind::Bottleneck,
        [3, 8, 36, 3],
        64,
    );
    /// Wide ResNet-50-2.
    pub const WIDE_RESNET50_2: Arch = Arch::new(
        "wide_resnet50_2",
        "Wide ResNet-50-2",
        BlockKind::Bottleneck,
        [3, 4, 6, 3],
        128,
    );
    /// Wide ResNet-101-2.
    pub const WIDE_RESNET101_2: Arch = Arch::new(
        "wide_resnet101_2",
        "Wide ResNet-101-2",
        BlockKind::Bottleneck,
        [3, 4, 23, 3],
        128,
    );

    /// Every architecture torchvision ships, smallest first.
    pub const ALL: [Arch; 7] = [
        Arch::RESNET18,
        Arch::RESNET34,
        Arch::RESNET50,
        Arch::RESNET101,
        Arch::RESNET152,
        Arch::WIDE_RESNET50_2,
        Arch::WIDE_RESNET101_2,
    ];

    const fn new(
        name: &'static str,
        title: &'static str,
        block: BlockKind,
        depths: [usize; 4],
        width_per_group: usize,
    ) -> Arch {
        Arch {
            name,
            title,
            block,
            depths,
            width_per_group,
        }
    }

    /// The architecture torchvision builds with `name` (e.g. `resnet18`).
    pub fn by_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name == name)
    }

    /// Width of the features (the channels of the last stage): 512 for basic blocks, 2048
    /// for bottlenecks.
    pub const fn feature_dim(&self) -> usize {
        PLANES[3] * self.block.expansion()
    }

    /// The stem: a 7×7 convolution with stride 2 (a 3×3 max pool follows).
    pub fn stem(&self) -> ConvSpec {
        ConvSpec {
            conv: "conv1".into(),
            bn: "bn1".into(),
            shape: [PLANES[0], 3, 7, 7],
            stride: 2,
        }
    }

    /// Every block in order, with torchvision's names and shapes.
    pub fn blocks(&self) -> Vec<BlockSpec> {
        let mut blocks = Vec::new();
        let mut in_ch = PLANES[0];
        let expansion = self.block.expansion();
        for (stage, (&n, &planes)) in self.depths.iter().zip(PLANES.iter()).enumerate() {
            let out = planes * expansion;
            for block in 0..n {
                let spec = |i: usize, shape: [usize; 4], stride: usize| ConvSpec {
                    conv: format!("layer{}.{block}.conv{i}", stage + 1),
                    bn: format!("layer{}.{block}.bn{i}", stage + 1),
                    shape,
                    stride,
                };
                // Stages 2-4 halve the resolution in their first block.
                let stride = if block == 0 && stage > 0 { 2 } else { 1 };
                let main = match self.block {
                    BlockKind::Basic => vec![
                        spec(1, [planes, in_ch, 3, 3], stride),
                        spec(2, [planes, planes, 3, 3], 1),
                    ],
                    BlockKind::Bottleneck => {
                        let width = planes * self.width_per_group / 64;
                        vec![
                            spec(1, [width, in_ch, 1, 1], 1),
                            spec(2, [width, width, 3, 3], stride),
                            spec(3, [out, width, 1, 1], 1),
                        ]
                    }
                };
                let downsample = (stride != 1 || in_ch != out).then(|| ConvSpec {
                    conv: format!("layer{}.{block}.downsample.0", stage + 1),
                    bn: format!("layer{}.{block}.downsample.1", stage + 1),
                    shape: [out, in_ch, 1, 1],
                    stride,
                });
                blocks.push(BlockSpec { main, downsample });
                in_ch = out;
            }
        }
        blocks
    }

    /// Every convolution in torchvision's state-dict order: the stem, then each block's main
    /// path and its projection shortcut.
    pub fn convs(&self) -> Vec<ConvSpec> {
        let mut convs = vec![self.stem()];
        for b in self.blocks() {
            convs.extend(b.main);
            convs.extend(b.downsample);
        }
        convs
    }

    /// The architecture a state dict holds, from its key names and shapes alone: the blocks
    /// per stage (the largest `layer<s>.<b>.` index of each), the block kind (a `conv3` in
    /// `layer1.0` means bottlenecks) and the width of `layer1.0.conv1` (128 for the wide
    /// ResNets). `None` when the keys describe none of [`Arch::ALL`] (not a torchvision
    /// ResNet, or a damaged one: strict loading then names what is wrong).
    pub fn infer<'a>(keys: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Option<Arch> {
        let mut depths = [0usize; 4];
        let mut bottleneck = false;
        let mut width = None;
        for (key, shape) in keys {
            let Some(rest) = key.strip_prefix("layer") else {
                continue;
            };
            let mut parts = rest.splitn(3, '.');
            let (Some(stage), Some(block)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(stage), Ok(block)) = (stage.parse::<usize>(), block.parse::<usize>()) else {
                continue;
            };
            if !(1..=4).contains(&stage) {
                continue;
            }
            depths[stage - 1] = depths[stage - 1].max(block.saturating_add(1));
            match key {
                "layer1.0.conv3.weight" => bottleneck = true,
                "layer1.0.conv1.weight" => width = shape.first().copied(),
                _ => {}
            }
        }
        let block = if bottleneck {
            BlockKind::Bottleneck
        } else {
            BlockKind::Basic
        };
        // A bottleneck's inner width is planes · width_per_group / 64, with planes = 64 in
        // layer1: the width per group itself. A basic block has none (64).
        let width_per_group = match block {
            BlockKind::Bottleneck => width?,
            BlockKind::Basic => 64,
        };
        Arch::ALL.into_iter().find(|a| {
            a.block == block && a.depths == depths && a.width_per_group == width_per_group
        })
    }

    /// A short description for messages, e.g. `bottleneck blocks [3, 4, 23, 3]`.
    pub fn describe(&self) -> String {
        let kind = match self.block {
            BlockKind::Basic => "basic",
            BlockKind::Bottleneck if self.width_per_group != 64 => "wide bottleneck",
            BlockKind::Bottleneck => "bottleneck",
        };
        format!("{kind} blocks {:?}", self.depths)
    }

    /// Every tensor the backbone needs, with its shape, in torchvision's state-dict order:
    /// the list strict loading checks a weights file against. The classifier `fc.*` and the
    /// `num_batches_tracked` counters are not listed: they are ignored on purpose.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut keys = Vec::new();
        for c in self.convs() {
            keys.push((format!("{}.weight", c.conv), c.shape.to_vec()));
            for leaf in ["weight", "bias", "running_mean", "running_var"] {
                keys.push((format!("{}.{leaf}", c.bn), vec![c.shape[0]]));
            }
        }
        keys
    }
}

impl Default for Arch {
    /// ResNet-50.
    fn default() -> Arch {
        Arch::RESNET50
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters without the classifier, from the key list.
    fn params(arch: &Arch) -> usize {
        arch.keys()
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    #[test]
    fn key_lists_match_torchvision_parameter_counts() {
        // torchvision's parameter counts (its model docs, `sum(p.numel())`), minus the
        // classifier `fc` (feature_dim × 1000 + 1000).
        for (arch, total) in [
            (Arch::RESNET18, 11_689_512),
            (Arch::RESNET34, 21_797_672),
            (Arch::RESNET50, 25_557_032),
            (Arch::RESNET101, 44_549_160),
            (Arch::RESNET152, 60_192_808),
            (Arch::WIDE_RESNET50_2, 68_883_240),
            (Arch::WIDE_RESNET101_2, 126_886_696),
        ] {
            let fc = arch.feature_dim() * 1000 + 1000;
            assert_eq!(params(&arch), total - fc, "{arch}");
            assert_eq!(Arch::by_name(arch.name), Some(arch));
        }
        // ResNet-50: 53 conv+bn pairs (1 stem + 16 blocks × 3 + 4 downsamples), 5 tensors each.
        assert_eq!(Arch::RESNET50.keys().len(), 53 * 5);
        assert_eq!(Arch::default().feature_dim(), 2048);
        assert_eq!(Arch::RESNET18.feature_dim(), 512);
    }

    #[test]
    fn every_architecture_is_recognised_from_its_keys() {
        for arch in Arch::ALL {
            let mut keys = arch.keys();
            keys.push(("fc.weight".into(), vec![1000, arch.feature_dim()]));
            keys.push(("layer2.0.bn1.num_batches_tracked".into(), vec![]));
            let found = Arch::infer(keys.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
            assert_eq!(found, Some(arch), "{arch}");
        }
        // ResNet-50 and its wide variant differ only in widths.
        let narrow = [("layer1.0.conv1.weight", &[64usize, 64, 1, 1][..])];
        let mut keys = Arch::WIDE_RESNET50_2.keys();
        keys.retain(|(k, _)| k != narrow[0].0);
        let as_50 = keys
            .iter()
            .map(|(k, s)| (k.as_str(), s.as_slice()))
            .chain(narrow);
        assert_eq!(Arch::infer(as_50), Some(Arch::RESNET50));
        // A stage with a block more than any ResNet has, or no keys at all: nothing.
        let mut keys = Arch::RESNET18.keys();
        keys.push(("layer3.2.conv1.weight".into(), vec![256, 256, 3, 3]));
        assert_eq!(
            Arch::infer(keys.iter().map(|(k, s)| (k.as_str(), s.as_slice()))),
            None
        );
        assert_eq!(Arch::infer([]), None);
        assert_eq!(
            Arch::RESNET101.describe(),
            "bottleneck blocks [3, 4, 23, 3]"
        );
    }

    #[test]
    fn basic_blocks_project_only_where_the_shape_changes() {
        let blocks = Arch::RESNET18.blocks();
        assert_eq!(blocks.len(), 8);
        // layer1.0 keeps 64 channels at stride 1: identity shortcut.
        assert!(blocks[0].downsample.is_none());
        assert_eq!(blocks[0].main[0].shape, [64, 64, 3, 3]);
        // layer2.0 halves the resolution on its first 3×3.
        assert_eq!(blocks[2].main[0].stride, 2);
        assert_eq!(
            blocks[2].downsample.as_ref().map(|d| d.conv.as_str()),
            Some("layer2.0.downsample.0")
        );
        // Wide bottlenecks widen the inner convolutions only.
        let wide = &Arch::WIDE_RESNET50_2.blocks()[0];
        assert_eq!(wide.main[1].shape, [128, 128, 3, 3]);
        assert_eq!(wide.main[2].shape, [256, 128, 1, 1]);
    }
}
