//! Helpers shared by the root end-to-end tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs a command quietly; true when it succeeded.
pub fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Panics, with a message that says why, unless the test runs as root.
pub fn require_root() {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert!(
        root,
        "this test creates network namespaces and loads BPF programs: run it as root"
    );
}

/// Python for a server on `addr` (IPv4 or IPv6) that answers "ok" on each TCP port and echoes
/// "ok" to each datagram on each UDP port.
pub fn server_code(addr: &str, tcp: &[u16], udp: &[u16]) -> String {
    let list = |v: &[u16]| {
        v.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let (tcp, udp) = (list(tcp), list(udp));
    format!(
        "import socket,threading\n\
         fam=socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET\n\
         def tcp(p):\n  s=socket.socket(fam); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('{addr}',p)); s.listen(16)\n  \
         while True:\n    c,_=s.accept(); c.sendall(b'ok'); c.close()\n\
         def udp(p):\n  s=socket.socket(fam,socket.SOCK_DGRAM); s.bind(('{addr}',p))\n  \
         while True:\n    _,a=s.recvfrom(64); s.sendto(b'ok',a)\n\
         for p in [{tcp}]: threading.Thread(target=tcp,args=(p,),daemon=True).start()\n\
         for p in [{udp}]: threading.Thread(target=udp,args=(p,),daemon=True).start()\n\
         threading.Event().wait()\n"
    )
}

/// Python that exits 0 when a UDP datagram to `addr:port` is answered with "ok" within a second.
pub fn udp_client_code(addr: &str, port: u16) -> String {
    format!(
        "import socket,sys\nfam=socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET\n\
         s=socket.socket(fam,socket.SOCK_DGRAM); s.settimeout(1); s.sendto(b'hi',('{addr}',{port}))\n\
         sys.exit(0 if s.recv(2)==b'ok' else 1)\n"
    )
}

/// Python that exits 0 when a TCP connection gets the server's "ok" within a second.
pub fn client_code(addr: &str, port: u16) -> String {
    format!(
        "import socket,sys\ns=socket.create_connection(('{addr}',{port}),timeout=1)\nsys.exit(0 if s.recv(2)==b'ok' else 1)\n"
    )
}

/// Removes pinned links and maps from a test's private bpffs and unmounts it.
pub fn remove_bpffs(dir: &Path) {
    let _ = fs::remove_dir_all(dir.join("links"));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    sh(&["umount", &dir.display().to_string()]);
}

/// Python for an HTTP/1.1 server on `addr:port` that answers every GET and POST with 200 and
/// `saw METHOD PATH`.
pub fn http_server_code(addr: &str, port: u16) -> String {
    format!(
        "import http.server,socket\n\
         class S(http.server.ThreadingHTTPServer):\n  address_family=socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET\n\
         class H(http.server.BaseHTTPRequestHandler):\n  protocol_version='HTTP/1.1'\n  \
         def reply(self):\n    n=int(self.headers.get('Content-Length') or 0); self.rfile.read(n)\n    \
         b=('saw '+self.command+' '+self.path+'\\n').encode()\n    \
         self.send_response(200); self.send_header('Content-Length',str(len(b))); self.end_headers(); self.wfile.write(b)\n  \
         do_GET=reply\n  do_POST=reply\n  \
         def log_message(self,*a): pass\n\
         S(('{addr}',{port}),H).serve_forever()\n"
    )
}

/// Python that sends `count` ICMP echo requests to the IPv4 address `addr`, one at a time, and
/// prints the TTL of each reply (a line per reply; a request unanswered within a second ends it).
pub fn icmp_echo_ttls_code(addr: &str, count: u16) -> String {
    format!(
        "import socket,struct,sys,os\n\
         def csum(b):\n  b+=b'\\0'*(len(b)%2); s=sum(struct.unpack('!%dH'%(len(b)//2),b)); s=(s>>16)+(s&0xffff); s+=s>>16; return ~s&0xffff\n\
         ident=os.getpid()&0xffff\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP); s.settimeout(1)\n\
         for seq in range({count}):\n  \
           body=struct.pack('!BBHHH',8,0,0,ident,seq)+b'membrane'\n  \
           s.sendto(body[:2]+struct.pack('!H',csum(body))+body[4:],('{addr}',0))\n  \
           while True:\n    \
             d=s.recv(1024); ihl=(d[0]&15)*4\n    \
             if d[ihl]==0 and struct.unpack('!HH',d[ihl+4:ihl+8])==(ident,seq): print(d[8]); break\n"
    )
}

/// Python that exits 0 when an ICMP echo request to the IPv4 address `addr` is answered within a
/// second (raw socket: needs root).
pub fn icmp_echo_code(addr: &str) -> String {
    format!(
        "import socket,struct,sys,os\n\
         def csum(b):\n  b+=b'\\0'*(len(b)%2); s=sum(struct.unpack('!%dH'%(len(b)//2),b)); s=(s>>16)+(s&0xffff); s+=s>>16; return ~s&0xffff\n\
         ident=os.getpid()&0xffff\n\
         body=struct.pack('!BBHHH',8,0,0,ident,1)+b'membrane'\n\
         pkt=body[:2]+struct.pack('!H',csum(body))+body[4:]\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP); s.settimeout(1)\n\
         s.sendto(pkt,('{addr}',0))\n\
         try:\n  \
           while True:\n    \
             d=s.recv(1024); ihl=(d[0]&15)*4\n    \
             if d[ihl]==0 and struct.unpack('!H',d[ihl+4:ihl+6])[0]==ident: sys.exit(0)\n\
         except socket.timeout: sys.exit(1)\n"
    )
}
