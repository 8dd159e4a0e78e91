//! The frozen ResNet-50 backbone: torchvision's architecture and weights, batch norm folded.

pub mod fast;
pub mod resnet;
pub mod weights;
