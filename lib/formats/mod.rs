//! The file formats the tools stand on, below every command: tensor element types, safetensors
//! writing, torch zip/pickle reading, the sharded-source interface zero-to-fp32 and `ckpt verify`
//! read checkpoints through, and checkpoint tags (`latest`). Nothing here knows the model, the
//! engine or a command; docs/ARCHITECTURE.md has the layer order.

pub mod dtype;
pub mod safetensors;
pub mod source;
pub mod tags;
pub mod tfevents;
pub mod torch_pickle;
pub mod torch_zip;
