//! Other tools' formats: torch checkpoint files, DeepSpeed ZeRO checkpoints, safetensors output.

pub mod deepspeed;
pub mod safetensors_out;
pub mod torch_pickle;
