//! The start of a multi-process group: rank 0 listens on `MASTER_ADDR` at the rendezvous port
//! (`MASTER_PORT + 1`, since torchrun's own store listens on `MASTER_PORT`; or
//! `MOE_PEFT_RENDEZVOUS_PORT`), every other rank connects and says who it is, and rank 0 sends
//! each the same payload (the NCCL unique id). Plain TCP on the host; nothing else goes over it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The launcher's view of this process (torchrun's environment variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world_size: usize,
    /// `LOCAL_RANK` (the GPU this process drives).
    pub local_rank: usize,
    /// `MASTER_ADDR`.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
    /// Where rank 0 listens for the others: `MOE_PEFT_RENDEZVOUS_PORT`, else `MASTER_PORT + 1`.
    pub rendezvous_port: u16,
}

impl LaunchEnv {
    /// Reads the variables through `get` (`std::env::var` in a program); `None` when `RANK`
    /// and `WORLD_SIZE` are both unset (not launched as a group). A variable that is set but
    /// malformed is an error naming it.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if get("RANK").is_none() && get("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let num = |k: &str, default: Option<usize>| -> Result<usize> {
            match get(k) {
                Some(v) => v.trim().parse().map_err(|_| {
                    Error::InvalidInput(format!("environment variable {k}={v:?} is not a number"))
                }),
                None => default.ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "environment variable {k} is not set (RANK and WORLD_SIZE come together)"
                    ))
                }),
            }
        };
        let rank = num("RANK", None)?;
        let world_size = num("WORLD_SIZE", None)?;
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidInput(format!(
                "RANK={rank} must be below WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let master_port = num("MASTER_PORT", Some(29500))?;
        let master_port = u16::try_from(master_port)
            .map_err(|_| Error::InvalidInput(format!("MASTER_PORT={master_port} is not a port")))?;
        let rendezvous_port = match get("MOE_PEFT_RENDEZVOUS_PORT") {
            Some(_) => {
                let p = num("MOE_PEFT_RENDEZVOUS_PORT", None)?;
                u16::try_from(p).map_err(|_| {
                    Error::InvalidInput(format!("MOE_PEFT_RENDEZVOUS_PORT={p} is not a port"))
                })?
            }
            None => master_port.checked_add(1).ok_or_else(|| {
                Error::InvalidInput(
                    "MASTER_PORT=65535 leaves no port for the rendezvous (MASTER_PORT + 1); set MOE_PEFT_RENDEZVOUS_PORT".into(),
                )
            })?,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            rendezvous_port,
        }))
    }
}

const HELLO: &[u8; 8] = b"moepeft1";

/// Rank 0: accepts `world − 1` ranks on `MASTER_ADDR:rendezvous_port` and sends each
/// `payload`. Other ranks:
/// connect (retrying until `timeout`), announce their rank, and return the payload.
pub fn exchange(env: &LaunchEnv, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let where_ = format!("{}:{}", env.master_addr, env.rendezvous_port);
    let io = |what: &str, e: std::io::Error| {
        Error::InvalidInput(format!("rendezvous at {where_} ({what}): {e}"))
    };
    if env.rank == 0 {
        let listener = TcpListener::bind(&where_).map_err(|e| io("listening", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("listening", e))?;
        let start = Instant::now();
        let mut seen = vec![false; env.world_size];
        seen[0] = true;
        let mut waiting = env.world_size - 1;
        while waiting > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| io("accepting", e))?;
                    s.set_read_timeout(Some(timeout))
                        .map_err(|e| io("accepting", e))?;
                    let mut hello = [0u8; 16];
                    s.read_exact(&mut hello)
                        .map_err(|e| io("reading a rank", e))?;
                    if &hello[..8] != HELLO {
                        return Err(Error::InvalidInput(format!(
                            "rendezvous at {where_}: a connection that is not a moe-peft rank"
                        )));
                    }
                    let r = u64::from_le_bytes(hello[8..16].try_into().unwrap_or([0; 8])) as usize;
                    if r == 0 || r >= env.world_size || seen[r] {
                        return Err(Error::InvalidInput(format!(
                            "rendezvous at {where_}: rank {r} announced twice or out of range (world {})",
                            env.world_size
                        )));
                    }
                    seen[r] = true;
                    waiting -= 1;
                    s.write_all(&(payload.len() as u64).to_le_bytes())
                        .and_then(|_| s.write_all(payload))
                        .map_err(|e| io("sending", e))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > timeout {
                        let missing: Vec<usize> =
                            (0..env.world_size).filter(|&r| !seen[r]).collect();
                        return Err(Error::InvalidInput(format!(
                            "rendezvous at {where_}: ranks {missing:?} did not connect within {:?}",
                            timeout
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io("accepting", e)),
            }
        }
        return Ok(payload.to_vec());
    }
    let start = Instant::now();
    let addr = where_
        .to_socket_addrs()
        .map_err(|e| io("resolving", e))?
        .next()
        .ok_or_else(|| Error::InvalidInput(format!("rendezvous at {where_}: no address")))?;
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > timeout => return Err(io("connecting", e)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| io("connecting", e))?;
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(HELLO);
    hello[8..].copy_from_slice(&(env.rank as u64).to_le_bytes());
    s.write_all(&hello).map_err(|e| io("announcing", e))?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(|e| io("receiving", e))?;
    let n = u64::from_le_bytes(len) as usize;
    if n > 1 << 20 {
        return Err(Error::InvalidInput(format!(
            "rendezvous at {where_}: a payload of {n} bytes"
        )));
    }
    let mut out = vec![0u8; n];
    s.read_exact(&mut out).map_err(|e| io("receiving", e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_environment_is_read_as_torchrun_sets_it() -> Result<()> {
        let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let none = vars(&[]);
        assert_eq!(LaunchEnv::from_env(&|k| none.get(k).cloned())?, None);
        let v = vars(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1234")]);
        let e = LaunchEnv::from_env(&|k| v.get(k).cloned())?.expect("launched");
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_port),
            (1, 2, 1, 1234)
        );
        assert_eq!(e.master_addr, "127.0.0.1");
        let v = vars(&[("RANK", "2"), ("WORLD_SIZE", "2")]);
        let err = LaunchEnv::from_env(&|k| v.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=2"), "{err}");
        let v = vars(&[("RANK", "x"), ("WORLD_SIZE", "2")]);
        let err = LaunchEnv::from_env(&|k| v.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK"), "{err}");
        Ok(())
    }

    #[test]
    fn every_rank_gets_rank_zeros_payload() -> Result<()> {
        // A free port: bind to 0, read it, release it.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let world = 4;
        let payload: Vec<u8> = (0..128u8).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..world)
                .map(|rank| {
                    let payload = payload.clone();
                    s.spawn(move || {
                        let env = LaunchEnv {
                            rank,
                            world_size: world,
                            local_rank: rank,
                            master_addr: "127.0.0.1".into(),
                            master_port: port.saturating_sub(1),
                            rendezvous_port: port,
                        };
                        let mine = if rank == 0 { payload } else { Vec::new() };
                        exchange(&env, &mine, Duration::from_secs(20))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("rank"))
                .collect::<Result<Vec<_>>>()
        })?;
        assert!(got.iter().all(|g| g == &payload));
        // A rank that never connects is named.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let env = LaunchEnv {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port.saturating_sub(1),
            rendezvous_port: port,
        };
        let e = exchange(&env, b"x", Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1]") && e.contains(&port.to_string()), "{e}");
        Ok(())
    }
}
