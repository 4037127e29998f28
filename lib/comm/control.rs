//! The control plane: a TCP star around rank 0. Frames are `[kind: u8][len: u64 LE][payload]`.
//! Reductions gather to rank 0, combine in rank order (so results are deterministic) and
//! broadcast back. Any failure is turned into an ABORT frame that rank 0 relays to every rank.

use super::{CommError, Rendezvous};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const HELLO: u8 = 0;
const DATA: u8 = 1;
const ABORT: u8 = 2;
const MAGIC: &[u8; 8] = b"zerokit1";

enum Role {
    Root { peers: Vec<TcpStream> }, // peers[k] is rank k+1
    Leaf { root: TcpStream },
}

pub struct ControlPlane {
    rank: usize,
    world: usize,
    timeout: Duration,
    role: Role,
}

fn io_err(rank: usize, peer: usize, what: &str, timeout: Duration, e: std::io::Error) -> CommError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            CommError::Timeout { rank, peer, what: what.to_string(), timeout }
        }
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            CommError::Peer { rank, peer, msg: format!("rank {peer} exited or closed its connection during {what}") }
        }
        _ => CommError::Peer { rank, peer, msg: format!("{what}: {e}") },
    }
}

fn write_frame(s: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

impl ControlPlane {
    /// The control plane of a world of one: no sockets, every collective is the identity.
    pub fn single() -> Self {
        ControlPlane { rank: 0, world: 1, timeout: Duration::from_secs(0), role: Role::Root { peers: Vec::new() } }
    }

    /// Connects all ranks. Rank 0 listens on the rendezvous address; the others retry until it is
    /// up or the timeout passes.
    pub fn connect(rdv: &Rendezvous) -> Result<Self, CommError> {
        let addr = format!("{}:{}", rdv.master_addr, rdv.master_port);
        let (rank, world, timeout) = (rdv.rank, rdv.world, rdv.timeout);
        let deadline = Instant::now() + timeout;
        let rdv_err = |msg: String| CommError::Rendezvous { addr: addr.clone(), msg };
        if world == 1 {
            return Ok(Self::single());
        }
        let role = if rank == 0 {
            let listener = TcpListener::bind(&addr).map_err(|e| rdv_err(format!("rank 0 cannot listen: {e}")))?;
            listener.set_nonblocking(true).map_err(|e| rdv_err(e.to_string()))?;
            let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            let mut joined = 0;
            while joined < world - 1 {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(|e| rdv_err(e.to_string()))?;
                        s.set_nodelay(true).ok();
                        s.set_read_timeout(Some(timeout)).ok();
                        let (kind, hello) = read_frame(&mut s).map_err(|e| rdv_err(format!("bad hello: {e}")))?;
                        if kind != HELLO || hello.len() != 24 || &hello[..8] != MAGIC {
                            return Err(rdv_err("a connection that is not a zerokit rank arrived".into()));
                        }
                        let r = u64::from_le_bytes(hello[8..16].try_into().expect("8")) as usize;
                        let w = u64::from_le_bytes(hello[16..24].try_into().expect("8")) as usize;
                        if w != world {
                            return Err(rdv_err(format!("rank {r} has world size {w}, rank 0 has {world}")));
                        }
                        if r == 0 || r >= world || peers[r - 1].is_some() {
                            return Err(rdv_err(format!("rank {r} joined twice or is out of range (world {world})")));
                        }
                        peers[r - 1] = Some(s);
                        joined += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = peers
                                .iter()
                                .enumerate()
                                .filter(|(_, p)| p.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(rdv_err(format!(
                                "timed out after {timeout:?} waiting for rank(s) {}",
                                missing.join(", ")
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(rdv_err(e.to_string())),
                }
            }
            Role::Root { peers: peers.into_iter().map(|p| p.expect("all joined")).collect() }
        } else {
            let mut s = loop {
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) => {
                        if Instant::now() > deadline {
                            return Err(rdv_err(format!("rank {rank} cannot reach rank 0: {e}")));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            };
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(timeout)).ok();
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&(rank as u64).to_le_bytes());
            hello.extend_from_slice(&(world as u64).to_le_bytes());
            write_frame(&mut s, HELLO, &hello).map_err(|e| rdv_err(e.to_string()))?;
            Role::Leaf { root: s }
        };
        Ok(ControlPlane { rank, world, timeout, role })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How long a rank waits for another before giving up.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0 receives every rank's payload (index = rank); the others receive None.
    pub fn gather(&mut self, payload: &[u8], what: &str) -> Result<Option<Vec<Vec<u8>>>, CommError> {
        let (rank, timeout) = (self.rank, self.timeout);
        match &mut self.role {
            Role::Leaf { root } => {
                write_frame(root, DATA, payload).map_err(|e| io_err(rank, 0, what, timeout, e))?;
                Ok(None)
            }
            Role::Root { peers } => {
                let mut all = vec![payload.to_vec()];
                // Indexed, not iterated: relay_abort below needs the other peers too.
                #[allow(clippy::needless_range_loop)]
                for k in 0..peers.len() {
                    let got = read_frame(&mut peers[k]);
                    match got {
                        Ok((DATA, p)) => all.push(p),
                        Ok((ABORT, msg)) => {
                            let msg = String::from_utf8_lossy(&msg).into_owned();
                            self.relay_abort(k + 1, &msg);
                            return Err(CommError::Aborted { rank, peer: k + 1, msg });
                        }
                        Ok((kind, _)) => {
                            return Err(CommError::Protocol {
                                rank,
                                msg: format!("unexpected frame {kind} from rank {}", k + 1),
                            })
                        }
                        Err(e) => {
                            let err = io_err(rank, k + 1, what, timeout, e);
                            self.relay_abort(k + 1, &err.to_string());
                            return Err(err);
                        }
                    }
                }
                Ok(Some(all))
            }
        }
    }

    /// Rank 0 sends `payload` to every rank; every rank returns it.
    pub fn broadcast(&mut self, payload: Option<&[u8]>, what: &str) -> Result<Vec<u8>, CommError> {
        let (rank, timeout) = (self.rank, self.timeout);
        match &mut self.role {
            Role::Root { peers } => {
                let p = payload.expect("rank 0 provides the broadcast payload");
                for (k, s) in peers.iter_mut().enumerate() {
                    write_frame(s, DATA, p).map_err(|e| io_err(rank, k + 1, what, timeout, e))?;
                }
                Ok(p.to_vec())
            }
            Role::Leaf { root } => match read_frame(root) {
                Ok((DATA, p)) => Ok(p),
                Ok((ABORT, msg)) => {
                    let text = String::from_utf8_lossy(&msg).into_owned();
                    let (peer, msg) = parse_abort(&text);
                    Err(CommError::Aborted { rank, peer, msg })
                }
                Ok((kind, _)) => Err(CommError::Protocol { rank, msg: format!("unexpected frame {kind} from rank 0") }),
                Err(e) => Err(io_err(rank, 0, what, timeout, e)),
            },
        }
    }

    /// Element-wise sum across ranks, combined in rank order on rank 0.
    pub fn all_reduce_f64(&mut self, values: &mut [f64], what: &str) -> Result<(), CommError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let summed = match self.gather(&bytes, what)? {
            Some(all) => {
                let mut acc = vec![0f64; values.len()];
                for (r, p) in all.iter().enumerate() {
                    if p.len() != bytes.len() {
                        return Err(CommError::Protocol {
                            rank: self.rank,
                            msg: format!("rank {r} sent {} values for {what}, expected {}", p.len() / 8, values.len()),
                        });
                    }
                    for (a, c) in acc.iter_mut().zip(p.chunks_exact(8)) {
                        *a += f64::from_le_bytes(c.try_into().expect("8"));
                    }
                }
                let out: Vec<u8> = acc.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.broadcast(Some(&out), what)?
            }
            None => self.broadcast(None, what)?,
        };
        for (v, c) in values.iter_mut().zip(summed.chunks_exact(8)) {
            *v = f64::from_le_bytes(c.try_into().expect("8"));
        }
        Ok(())
    }

    pub fn barrier(&mut self, what: &str) -> Result<(), CommError> {
        self.all_reduce_f64(&mut [], what)
    }

    /// Best effort: tell rank 0 (or, on rank 0, every rank) that this rank failed.
    pub fn abort(&mut self, msg: &str) {
        let rank = self.rank;
        self.relay_abort(rank, msg);
    }

    fn relay_abort(&mut self, origin: usize, msg: &str) {
        let text = format!("{origin}\n{msg}");
        match &mut self.role {
            Role::Leaf { root } => {
                let _ = write_frame(root, ABORT, text.as_bytes());
            }
            Role::Root { peers } => {
                for (k, s) in peers.iter_mut().enumerate() {
                    if k + 1 != origin {
                        let _ = write_frame(s, ABORT, text.as_bytes());
                    }
                }
            }
        }
    }
}

fn parse_abort(text: &str) -> (usize, String) {
    match text.split_once('\n') {
        Some((r, m)) => (r.parse().unwrap_or(0), m.to_string()),
        None => (0, text.to_string()),
    }
}
