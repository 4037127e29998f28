//! Other tools' checkpoints and model directories: Hugging Face model directories, DeepSpeed ZeRO
//! checkpoints, and zerokit's own checkpoints as a zero-to-fp32 source. `hf_model` picks a Hugging
//! Face directory's family (GPT-2 in `hf`, Llama in `hf_llama`, Gemma 2 and 3 in `hf_gemma`). The file formats they
//! are made of (safetensors, torch zip and pickle) are `formats`.

pub mod deepspeed;
pub mod deepspeed_resume;
pub mod hf;
pub mod hf_gemma;
pub mod hf_llama;
pub mod hf_model;
pub mod zerokit_source;
