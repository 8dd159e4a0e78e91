//! Getting CIFAR-10 into tensors: download, read, split and preprocess.

pub mod cifar;
pub mod download;
pub mod transform;
