//! NTLM message sealing for WS-Management over plain HTTP (MS-NLMP 3.4.4.2, extended
//! session security with key exchange; MS-WSMV 2.2.9.1 for the MIME framing WinRM and
//! pywinrm use). The NTLM handshake itself is the `smb2` crate's; this is what WinRM adds
//! on top of it: every request sealed with the client's RC4 key and signed, every reply
//! unsealed and its signature checked.

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use rc4::{Rc4, StreamCipher};

const C2S_SIGN: &[u8] = b"session key to client-to-server signing key magic constant\0";
const C2S_SEAL: &[u8] = b"session key to client-to-server sealing key magic constant\0";
const S2C_SIGN: &[u8] = b"session key to server-to-client signing key magic constant\0";
const S2C_SEAL: &[u8] = b"session key to server-to-client sealing key magic constant\0";
const BOUNDARY: &str = "Encrypted Boundary";
const PROTOCOL: &str = "application/HTTP-SPNEGO-session-encrypted";

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut hash = Md5::new();
    for part in parts {
        hash.update(part);
    }
    hash.finalize().into()
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Md5> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// One direction of a sealed session: its signing key, its RC4 state and sequence number.
struct Direction {
    sign_key: [u8; 16],
    rc4: Rc4,
    sequence: u32,
}

impl Direction {
    fn new(session_key: &[u8], sign: &[u8], seal: &[u8]) -> Self {
        let seal_key = md5(&[session_key, seal]);
        Direction {
            sign_key: md5(&[session_key, sign]),
            // RC4 takes keys of 1 to 256 bytes.
            rc4: <Rc4 as rc4::KeyInit>::new_from_slice(&seal_key)
                .unwrap_or_else(|_| unreachable!()),
            sequence: 0,
        }
    }

    /// The 16-byte signature of `plain` (its checksum encrypted with the same RC4 stream,
    /// after the message itself).
    fn signature(&mut self, plain: &[u8]) -> [u8; 16] {
        let seq = self.sequence.to_le_bytes();
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&hmac_md5(&self.sign_key, &[&seq, plain])[..8]);
        self.rc4.apply_keystream(&mut checksum);
        let mut signature = [0u8; 16];
        signature[..4].copy_from_slice(&1u32.to_le_bytes());
        signature[4..12].copy_from_slice(&checksum);
        signature[12..].copy_from_slice(&seq);
        self.sequence = self.sequence.wrapping_add(1);
        signature
    }
}

/// The sealing state of one authenticated NTLM session (client side).
pub struct Sealing {
    outgoing: Direction,
    incoming: Direction,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealing { .. }")
    }
}

impl Sealing {
    /// From the session's exported session key.
    pub fn new(session_key: &[u8]) -> Self {
        Sealing {
            outgoing: Direction::new(session_key, C2S_SIGN, C2S_SEAL),
            incoming: Direction::new(session_key, S2C_SIGN, S2C_SEAL),
        }
    }

    /// GSS_WrapEx: (signature, sealed message).
    pub fn seal(&mut self, plain: &[u8]) -> ([u8; 16], Vec<u8>) {
        let mut sealed = plain.to_vec();
        self.outgoing.rc4.apply_keystream(&mut sealed);
        let signature = self.outgoing.signature(plain);
        (signature, sealed)
    }

    /// GSS_UnwrapEx: the plain message, if its signature is right.
    pub fn unseal(&mut self, signature: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        let mut plain = sealed.to_vec();
        self.incoming.rc4.apply_keystream(&mut plain);
        let expected = self.incoming.signature(&plain);
        if signature != expected {
            return Err(
                "its NTLM signature does not match (tampered with, or out of sequence)".into(),
            );
        }
        Ok(plain)
    }

    /// A SOAP envelope as the `multipart/encrypted` body WinRM expects.
    pub fn wrap_message(&mut self, soap: &[u8]) -> Vec<u8> {
        let (signature, sealed) = self.seal(soap);
        let mut body = format!(
            "--{BOUNDARY}\r\n\tContent-Type: {PROTOCOL}\r\n\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length={}\r\n--{BOUNDARY}\r\n\tContent-Type: application/octet-stream\r\n",
            soap.len()
        )
        .into_bytes();
        body.extend_from_slice(&16u32.to_le_bytes());
        body.extend_from_slice(&signature);
        body.extend_from_slice(&sealed);
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    /// The SOAP envelope inside a `multipart/encrypted` reply.
    pub fn unwrap_message(&mut self, body: &[u8]) -> Result<Vec<u8>, String> {
        let marker = b"Content-Type: application/octet-stream\r\n";
        let start = find(body, marker).ok_or("no application/octet-stream part")? + marker.len();
        let original_length = find(body, b"Length=")
            .and_then(|at| {
                let digits: Vec<u8> = body[at + 7..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .copied()
                    .collect();
                std::str::from_utf8(&digits).ok()?.parse::<usize>().ok()
            })
            .ok_or("no OriginalContent length")?;
        let rest = &body[start..];
        let header_len = rest
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("the encrypted part is truncated")?;
        if header_len != 16 {
            return Err(format!("an NTLM signature of {header_len} bytes, not 16"));
        }
        let signature = rest.get(4..20).ok_or("the signature is truncated")?;
        let sealed = rest
            .get(20..20 + original_length)
            .ok_or("the sealed message is shorter than its stated length")?;
        self.unseal(signature, sealed)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// MS-NLMP 4.2.4.4: NTLMv2 with extended session security, RandomSessionKey
    /// 0x55 × 16 exchanged as the session key; "Plaintext" in UTF-16LE sealed with sequence 0.
    #[test]
    fn ms_nlmp_4_2_4_4_sealing_vector() {
        let session_key = [0x55u8; 16];
        let mut sealing = Sealing::new(&session_key);
        let plaintext = unhex("50 00 6c 00 61 00 69 00 6e 00 74 00 65 00 78 00 74 00");
        let (signature, sealed) = sealing.seal(&plaintext);
        assert_eq!(
            sealed,
            unhex("54 e5 01 65 bf 19 36 dc 99 60 20 c1 81 1b 0f 06 fb 5f")
        );
        assert_eq!(
            signature.to_vec(),
            unhex("01 00 00 00 7f b3 8e c5 c5 5d 49 76 00 00 00 00")
        );
    }

    /// Both ends derive their keys from one session key: what one seals, the other reads.
    #[test]
    fn a_wrapped_message_unwraps_at_the_other_end_and_tampering_is_caught() {
        let key = [7u8; 16];
        let mut client = Sealing::new(&key);
        // The server's view: its outgoing is the client's incoming.
        let mut server = Sealing {
            outgoing: Direction::new(&key, S2C_SIGN, S2C_SEAL),
            incoming: Direction::new(&key, C2S_SIGN, C2S_SEAL),
        };
        for round in 0..3 {
            let request = format!("<s:Envelope>request {round}</s:Envelope>");
            let wire = client.wrap_message(request.as_bytes());
            assert_eq!(server.unwrap_message(&wire).unwrap(), request.as_bytes());
            let reply = format!("<s:Envelope>reply {round}</s:Envelope>");
            let wire = server.wrap_message(reply.as_bytes());
            assert_eq!(client.unwrap_message(&wire).unwrap(), reply.as_bytes());
        }
        let mut wire = server.wrap_message(b"<x/>");
        let last = wire.len() - 30;
        wire[last] ^= 1;
        assert!(client.unwrap_message(&wire).is_err());
        assert!(client.unwrap_message(b"garbage").is_err());
    }
}
