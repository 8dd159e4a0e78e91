//! The frozen ResNet backbone (ResNet-50 by default): torchvision's architectures and weights,
//! batch norm folded. [`arch`] describes the network once; [`weights`] loads it strictly,
//! [`resnet`] (candle, the reference) and [`fast`] (our kernels) run it.

pub mod arch;
pub mod fast;
pub mod resnet;
pub mod weights;
