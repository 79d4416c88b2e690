//! Test backend: answers every TCP line with its own name (the line `peer`: its name and the
//! connection's peer address), an HTTP request with its name and the status found in
//! STATUS_FILE (200 when the file is absent), and `GET /bytes/N` with N bytes.
//!
//! A UDP datagram (up to 65535 bytes) gets `NAME\n` back; a request longer than that gets an
//! answer exactly as long as the request: `NAME\n`, then the request's own bytes from that
//! offset on. So a datagram far above the MTU gets an answer as large (fragmented both ways, for
//! fragment tests), and the client can check the answer byte for byte against its request.
//!
//! Usage: name-server NAME PORT [STATUS_FILE]. Listens on [::]:PORT (IPv4 too), TCP and UDP.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(port)) = (args.next(), args.next()) else {
        eprintln!("usage: name-server NAME PORT [STATUS_FILE]");
        std::process::exit(2);
    };
    let status_file = args.next();
    let addr = format!("[::]:{port}");
    let udp = UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let head = format!("{udp_name}\n").into_bytes();
        let mut buf = vec![0u8; 65535];
        while let Ok((len, peer)) = udp.recv_from(&mut buf) {
            // Short requests get the name alone; longer ones the name over the request's start.
            let answer = if len > head.len() {
                buf[..head.len()].copy_from_slice(&head);
                &buf[..len]
            } else {
                &head[..]
            };
            let _ = udp.send_to(answer, peer);
        }
    });
    println!("ready");
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        let status_file = status_file.clone();
        std::thread::spawn(move || {
            let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |p| p.to_string());
            let mut writer = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut lines = BufReader::new(stream).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(size) =
                    line.strip_prefix("GET /bytes/").and_then(|rest| rest.split(' ').next()?.parse().ok())
                {
                    // A download of `size` bytes: larger than any MTU, for path MTU tests.
                    for header in lines.by_ref() {
                        if header.map_or(true, |h| h.is_empty()) {
                            break;
                        }
                    }
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
                    let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&vec![b'x'; size]));
                    return;
                }
                if line.starts_with("GET ") || line.starts_with("HEAD ") {
                    // Skip the headers, answer, close.
                    for header in lines.by_ref() {
                        if header.map_or(true, |h| h.is_empty()) {
                            break;
                        }
                    }
                    let status: u16 = status_file
                        .as_ref()
                        .and_then(|f| std::fs::read_to_string(f).ok())
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(200);
                    let body = format!("{name}\n");
                    let _ = writer.write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                    return;
                }
                // `peer`: the name and the address the connection came from (to show that a
                // backend behind a tunnel sees the client's own address).
                let answer = if line == "peer" { format!("{name} {peer}\n") } else { format!("{name}\n") };
                if writer.write_all(answer.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
}
