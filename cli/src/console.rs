//! `keel console VM`: a VM's serial console over keeld's WebSocket.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use keel_api::keeld::Vm;

use crate::session::{Common, Error, client, typed};

/// An interactive serial console: keys go to the guest, its output to
/// this terminal; `Ctrl-]` ends the session.
pub fn run(common: &Common, vm: &str) -> Result<(), Error> {
    let c = client(common)?;
    let info: Vm = typed("VM", &c.get(&format!("/api/v1/vms/{vm}{}", common.q()))?)?;
    let id = info.id;
    let url = format!(
        "{}/api/v1/vms/{id}/console",
        c.server().replacen("http://", "ws://", 1),
    );
    // The token goes in the header, never in the URL.
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url)
        .map_err(|e| Error::Input(format!("cannot open the console: {e}")))?;
    if let Some(token) = c.token()
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = tungstenite::connect(request)
        .map_err(|e| Error::Input(format!("cannot open the console: {e}")))?;
    let ws = std::sync::Arc::new(std::sync::Mutex::new(ws));
    eprintln!("Connected to {vm}'s serial console; Ctrl-] quits.");
    let raw = std::io::stdin().is_terminal();
    if raw {
        let _ = std::process::Command::new("stty")
            .args(["raw", "-echo"])
            .status();
    }
    // Keys: a thread reading stdin.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(vec![0x1d]);
                    return;
                }
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    if let Ok(mut guard) = ws.lock()
        && let tungstenite::stream::MaybeTlsStream::Plain(s) = guard.get_mut()
    {
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    }
    let mut out = std::io::stdout();
    let result = 'session: loop {
        let Ok(mut socket) = ws.lock() else {
            break Ok(());
        };
        while let Ok(keys) = rx.try_recv() {
            if keys.contains(&0x1d) {
                let _ = socket.close(None);
                drop(socket);
                if raw {
                    let _ = std::process::Command::new("stty").arg("sane").status();
                }
                eprintln!();
                return Ok(());
            }
            if let Err(e) = socket.send(tungstenite::Message::Binary(keys.into())) {
                break 'session Err(Error::Input(format!("the console connection ended: {e}")));
            }
        }
        match socket.read() {
            Ok(tungstenite::Message::Binary(b)) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Ok(tungstenite::Message::Close(_)) => break Ok(()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => break Err(Error::Input(format!("the console connection ended: {e}"))),
        }
    };
    if raw {
        let _ = std::process::Command::new("stty").arg("sane").status();
    }
    result
}
