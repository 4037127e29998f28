//! Other tools' formats: Hugging Face model directories, torch checkpoint files, DeepSpeed ZeRO
//! checkpoints, streaming safetensors output;
//! and zerokit's own checkpoints as a zero-to-fp32 source.

pub mod deepspeed;
pub mod hf;
pub mod safetensors_out;
pub mod torch_pickle;
pub mod zerokit_source;
