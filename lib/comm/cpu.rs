//! The CPU backend: tensor collectives over the control plane. Sums are formed on rank 0 in rank
//! order, in the tensor's own dtype, so results are deterministic and identical on every rank.
//! It exists for tests and CPU runs; its speed is irrelevant.

use super::{Collectives, CommError, ControlPlane};
use tch::{Device, Tensor};

pub struct CpuComm {
    ctl: ControlPlane,
}

fn to_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn from_bytes(b: &[u8], like: &Tensor, numel: usize) -> Tensor {
    Tensor::from_data_size(b, &[numel as i64], like.kind())
}

impl CpuComm {
    pub fn new(ctl: ControlPlane) -> Self {
        CpuComm { ctl }
    }

    /// Sum of every rank's flat copy of `t`, as a CPU tensor of t's dtype (same on every rank).
    fn summed(&mut self, t: &Tensor, what: &str) -> Result<Tensor, CommError> {
        let numel = t.numel();
        let mine = to_bytes(t);
        let reply = match self.ctl.gather(&mine, what)? {
            Some(all) => {
                let mut acc = from_bytes(&all[0], t, numel);
                for (r, p) in all.iter().enumerate().skip(1) {
                    if p.len() != mine.len() {
                        let rank = self.ctl.rank();
                        let err = CommError::Protocol {
                            rank,
                            msg: format!("{what}: rank {r} sent {} bytes, rank 0 has {}", p.len(), mine.len()),
                        };
                        self.ctl.abort(&err.to_string());
                        return Err(err);
                    }
                    acc += from_bytes(p, t, numel);
                }
                self.ctl.broadcast(Some(&to_bytes(&acc)), what)?
            }
            None => self.ctl.broadcast(None, what)?,
        };
        Ok(from_bytes(&reply, t, numel))
    }
}

fn check_cpu(t: &Tensor, rank: usize) -> Result<(), CommError> {
    if t.device() != Device::Cpu {
        return Err(CommError::Protocol { rank, msg: "the CPU backend got a GPU tensor".into() });
    }
    Ok(())
}

impl Collectives for CpuComm {
    fn rank(&self) -> usize {
        self.ctl.rank()
    }

    fn world(&self) -> usize {
        self.ctl.world()
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<(), CommError> {
        check_cpu(t, self.rank())?;
        let sum = self.summed(t, "all_reduce")?;
        t.view(-1).copy_(&sum);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &Tensor) -> Result<(), CommError> {
        check_cpu(input, self.rank())?;
        let n = output.numel() as i64;
        if input.numel() as i64 != n * self.world() as i64 {
            return Err(CommError::Protocol {
                rank: self.rank(),
                msg: format!("reduce_scatter: input {} is not world {} x output {}", input.numel(), self.world(), n),
            });
        }
        let sum = self.summed(input, "reduce_scatter")?;
        output.view(-1).copy_(&sum.narrow(0, self.rank() as i64 * n, n));
        Ok(())
    }

    fn all_gather_in_place(&mut self, buffer: &Tensor) -> Result<(), CommError> {
        check_cpu(buffer, self.rank())?;
        let world = self.world() as i64;
        let total = buffer.numel() as i64;
        if total % world != 0 {
            return Err(CommError::Protocol {
                rank: self.rank(),
                msg: format!("all_gather: buffer of {total} is not divisible by world {world}"),
            });
        }
        let n = total / world;
        let mut flat = buffer.view(-1);
        let mine = to_bytes(&flat.narrow(0, self.rank() as i64 * n, n));
        let reply = match self.ctl.gather(&mine, "all_gather")? {
            Some(all) => {
                let joined: Vec<u8> = all.concat();
                self.ctl.broadcast(Some(&joined), "all_gather")?
            }
            None => self.ctl.broadcast(None, "all_gather")?,
        };
        if reply.len() != total as usize * buffer.kind().elt_size_in_bytes() {
            return Err(CommError::Protocol { rank: self.rank(), msg: "all_gather: ranks disagree on sizes".into() });
        }
        flat.copy_(&from_bytes(&reply, buffer, total as usize));
        Ok(())
    }

    fn wait_compute(&mut self) -> Result<(), CommError> {
        Ok(())
    }

    fn wait_comm(&mut self) -> Result<(), CommError> {
        Ok(())
    }

    fn control(&mut self) -> &mut ControlPlane {
        &mut self.ctl
    }

    fn abort(&mut self, msg: &str) {
        self.ctl.abort(msg)
    }
}
