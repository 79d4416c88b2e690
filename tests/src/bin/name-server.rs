//! Test backend: answers every TCP line and every UDP datagram with its own name.
//!
//! Usage: name-server NAME PORT. Listens on [::]:PORT (IPv4 too) for TCP and UDP.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(port)) = (args.next(), args.next()) else {
        eprintln!("usage: name-server NAME PORT");
        std::process::exit(2);
    };
    let addr = format!("[::]:{port}");
    let udp = UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name}\n").as_bytes(), peer);
        }
    });
    println!("ready");
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let mut writer = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            for line in BufReader::new(stream).lines() {
                if line.is_err() || writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
}
