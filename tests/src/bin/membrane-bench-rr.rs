//! `bench/datapath.sh`'s request/response peer: one TCP connection from each of two network
//! namespaces, 1-byte round trips on each in turn, a few milliseconds at a time, so that both
//! sides are measured under the same moment-to-moment conditions of a shared machine (whole-run
//! alternation left round ratios spread from 0.5 to 1.7 here).
//!
//! ```text
//! membrane-bench-rr serve PORT                         # echo server (run inside a namespace)
//! membrane-bench-rr NETNS_A ADDR_A:PORT NETNS_B ADDR_B:PORT SECS
//! ```
//! The client prints the round trips per second of A and of B.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Round trips per turn: ~5 ms at the rates seen here, short next to the drifts of the machine.
const TURN: u32 = 100;

fn serve(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        conn.set_nodelay(true)?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// A connection opened from inside network namespace `netns` (a socket stays in the namespace
/// it was made in; the namespace switch is confined to a short-lived thread).
fn connect_in(netns: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
        move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| io::Error::other("connecting thread panicked"))?
}

fn round_trips(s: &mut TcpStream, n: u32) -> io::Result<Duration> {
    let start = Instant::now();
    let mut b = [0u8; 1];
    for _ in 0..n {
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
    }
    Ok(start.elapsed())
}

fn client(a: (&str, &str), b: (&str, &str), secs: f64) -> Result<(f64, f64), String> {
    let open = |(ns, addr): (&str, &str)| -> Result<TcpStream, String> {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        connect_in(ns, addr).map_err(|e| format!("connecting from {ns} to {addr}: {e}"))
    };
    let mut conns = [open(a)?, open(b)?];
    let io = |e: io::Error| format!("round trip: {e}");
    for c in &mut conns {
        round_trips(c, 1000).map_err(io)?; // warm-up: caches, conntrack, neighbours
    }
    let mut spent = [Duration::ZERO; 2];
    let mut done = [0u64; 2];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut turn = 0usize;
    while Instant::now() < end {
        // Alternate which side goes first, so neither always follows the other's turn.
        for side in [turn % 2, 1 - turn % 2] {
            spent[side] += round_trips(&mut conns[side], TURN).map_err(io)?;
            done[side] += u64::from(TURN);
        }
        turn += 1;
    }
    let rate = |i: usize| done[i] as f64 / spent[i].as_secs_f64();
    Ok((rate(0), rate(1)))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", port] => port
            .parse()
            .map_err(|e| format!("port {port}: {e}"))
            .and_then(|p| serve(p).map_err(|e| e.to_string())),
        [ns_a, addr_a, ns_b, addr_b, secs] => secs
            .parse()
            .map_err(|e| format!("seconds {secs}: {e}"))
            .and_then(|s| client((ns_a, addr_a), (ns_b, addr_b), s))
            .map(|(ra, rb)| println!("{ra:.0} {rb:.0}")),
        _ => Err(
            "usage: membrane-bench-rr serve PORT | membrane-bench-rr NETNS_A ADDR_A:PORT NETNS_B ADDR_B:PORT SECS"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("membrane-bench-rr: {e}");
            ExitCode::FAILURE
        }
    }
}
