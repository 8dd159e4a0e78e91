//! The candle reference ResNet up to its global average pool, in torchvision's layout, batch
//! norm folded.
//!
//! He et al., "Deep Residual Learning for Image Recognition" (2015), as torchvision builds
//! it ("ResNet v1.5": the stride of a down-sampling bottleneck sits on its 3×3 convolution,
//! not on the first 1×1), for any [`Arch`] (ResNet-50 by default). The network is frozen:
//! every convolution carries its folded batch norm as a bias, weights are plain tensors
//! (never `Var`s), so no autograd graph is kept. Written in the style of candle's own
//! `resnet.rs`, with strict weight loading from [`super::weights`].

use std::path::Path;

use candle_core::{D, Module, Tensor};

use super::arch::{Arch, ConvSpec};
use super::weights::StateDict;
use crate::error::{CandleContext, Result};

/// A convolution with its batch norm folded in: `conv(x, w) + b`.
#[derive(Debug, Clone)]
struct ConvBn {
    /// `[out, in, k, k]`
    weight: Tensor,
    /// `[1, out, 1, 1]`, ready to broadcast over `[batch, out, h, w]`.
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl ConvBn {
    fn load(sd: &mut StateDict, spec: &ConvSpec) -> Result<Self> {
        let (weight, bias) = sd.take_conv_bn(spec)?;
        let bias = bias
            .reshape((1, spec.shape[0], 1, 1))
            .ctx(format!("reshaping the folded bias of `{}`", spec.conv))?;
        Ok(Self {
            weight,
            bias,
            stride: spec.stride,
            padding: spec.shape[2] / 2,
        })
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // [b, in, h, w] -> [b, out, h / stride, w / stride]
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias)
    }
}

/// A residual block, basic or bottleneck: `relu(main(x) + shortcut(x))`, the shortcut a
/// strided 1×1 projection where the block changes the shape.
#[derive(Debug, Clone)]
struct Block {
    /// A ReLU follows every convolution but the last.
    main: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for (i, conv) in self.main.iter().enumerate() {
            y = conv.forward(&y)?;
            if i + 1 < self.main.len() {
                y = y.relu()?;
            }
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// A ResNet without its classifier: images `[batch, 3, h, w]` → features
/// `[batch, feature_dim]`.
#[derive(Debug, Clone)]
pub struct ResNet {
    arch: Arch,
    stem: ConvBn,
    blocks: Vec<Block>,
}

/// The name the default architecture's network had before the backbone seam.
pub type ResNet50 = ResNet;

/// Width of the default backbone's (ResNet-50's) features; a network reports its own with
/// [`ResNet::feature_dim`].
pub const FEATURE_DIM: usize = Arch::RESNET50.feature_dim();

impl ResNet {
    /// Reads a torchvision ResNet-50 state dict (`.pth` or `.safetensors`) and builds the
    /// network.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_state_dict(StateDict::read(path)?)
    }

    /// Builds ResNet-50 from a state dict, strictly: every tensor is used or knowingly
    /// ignored, and every shape is checked.
    pub fn from_state_dict(sd: StateDict) -> Result<Self> {
        Self::with_arch(sd, &Arch::default())
    }

    /// Reads a torchvision `arch` state dict (`.pth` or `.safetensors`) and builds the
    /// network; a file of another architecture is refused naming both.
    pub fn load_arch(path: &Path, arch: &Arch) -> Result<Self> {
        Self::with_arch(StateDict::read(path)?, arch)
    }

    /// Builds `arch` from a state dict, strictly (as [`ResNet::from_state_dict`]); tensors
    /// of another torchvision ResNet are refused naming both architectures.
    pub fn with_arch(mut sd: StateDict, arch: &Arch) -> Result<Self> {
        sd.expect_arch(arch)?;
        let stem = ConvBn::load(&mut sd, &arch.stem())?;
        let blocks = arch
            .blocks()
            .iter()
            .map(|b| {
                Ok(Block {
                    main: b
                        .main
                        .iter()
                        .map(|c| ConvBn::load(&mut sd, c))
                        .collect::<Result<_>>()?,
                    downsample: b
                        .downsample
                        .as_ref()
                        .map(|d| ConvBn::load(&mut sd, d))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        sd.finish()?;
        Ok(Self {
            arch: *arch,
            stem,
            blocks,
        })
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// Width of the features.
    pub fn feature_dim(&self) -> usize {
        self.arch.feature_dim()
    }

    /// Runs the backbone: `[batch, 3, h, w]` normalised images → `[batch, feature_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_inner(x).ctx(format!(
            "running {} on input of shape {:?}",
            self.arch,
            x.dims()
        ))
    }

    fn forward_inner(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // [b, 3, h, w] -> [b, 64, h/2, w/2]
        let x = self.stem.forward(x)?.relu()?;
        // 3×3 max pool, stride 2, padding 1. After the ReLU every value is ≥ 0 and each
        // window holds at least one real pixel, so zero padding equals PyTorch's −∞ padding.
        // [b, 64, h/2, w/2] -> [b, 64, h/4, w/4]
        let x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        let mut x = x;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        // Global average pool: [b, feature_dim, h/32, w/32] -> [b, feature_dim]
        x.mean(D::Minus1)?.mean(D::Minus1)
    }
}
