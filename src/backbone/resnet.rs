//! ResNet-50 up to its global average pool, in torchvision's layout, batch norm folded.
//!
//! He et al., "Deep Residual Learning for Image Recognition" (2015), as torchvision builds
//! it ("ResNet v1.5": the stride of a down-sampling bottleneck sits on its 3×3 convolution,
//! not on the first 1×1). The network is frozen: every convolution carries its folded batch
//! norm as a bias, weights are plain tensors (never `Var`s), so no autograd graph is kept.
//! Written in the style of candle's own `resnet.rs`, with strict weight loading from
//! [`super::weights`].

use std::path::Path;

use candle_core::{D, Module, Tensor};

use super::weights::{ConvSpec, EXPANSION, StateDict, resnet50_blocks, stem_spec};
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

/// The bottleneck block: 1×1 reduce, 3×3 (carrying the stride), 1×1 expand, plus the
/// shortcut (a strided 1×1 projection in the first block of each stage).
#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
}

impl Module for Bottleneck {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.conv1.forward(x)?.relu()?;
        let y = self.conv2.forward(&y)?.relu()?;
        let y = self.conv3.forward(&y)?;
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// ResNet-50 without its classifier: images `[batch, 3, h, w]` → features `[batch, 2048]`.
#[derive(Debug, Clone)]
pub struct ResNet50 {
    stem: ConvBn,
    blocks: Vec<Bottleneck>,
}

/// Width of the features the backbone produces.
pub const FEATURE_DIM: usize = 512 * EXPANSION;

impl ResNet50 {
    /// Reads a torchvision state dict (`.pth` or `.safetensors`) and builds the network.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_state_dict(StateDict::read(path)?)
    }

    /// Builds the network from a state dict, strictly: every tensor is used or knowingly
    /// ignored, and every shape is checked.
    pub fn from_state_dict(mut sd: StateDict) -> Result<Self> {
        let stem = ConvBn::load(&mut sd, &stem_spec())?;
        let blocks = resnet50_blocks()
            .iter()
            .map(|b| {
                Ok(Bottleneck {
                    conv1: ConvBn::load(&mut sd, &b.conv1)?,
                    conv2: ConvBn::load(&mut sd, &b.conv2)?,
                    conv3: ConvBn::load(&mut sd, &b.conv3)?,
                    downsample: b
                        .downsample
                        .as_ref()
                        .map(|d| ConvBn::load(&mut sd, d))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        sd.finish()?;
        Ok(Self { stem, blocks })
    }

    /// Runs the backbone: `[batch, 3, h, w]` normalised images → `[batch, 2048]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_inner(x).ctx(format!(
            "running ResNet-50 on input of shape {:?}",
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
        // Global average pool: [b, 2048, h/32, w/32] -> [b, 2048]
        x.mean(D::Minus1)?.mean(D::Minus1)
    }
}
