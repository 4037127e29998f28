//! Other tools' formats: Hugging Face model directories, torch checkpoint files, DeepSpeed ZeRO
//! checkpoints, streaming safetensors output.

pub mod deepspeed;
pub mod hf;
pub mod safetensors_out;
pub mod torch_pickle;
