//! The body of a cluster message: the delivery copies published together
//! (whatever was waiting when the link published), so the broker handles
//! one message per batch instead of one per delivery.
//!
//! Binary and length-prefixed, so frames travel as they are (no JSON
//! escaping): `version: u8 = 1`, `count: u32`, then per copy the delivery
//! id, `users: u16` user ids, and the frame, each string as `len: u32` +
//! UTF-8 bytes. Integers are big-endian.

use crate::delivery::registry::OutboundFrame;

const VERSION: u8 = 1;

/// One delivery for the users' connections on other nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryCopy {
    /// The delivery id (the push frame's `id`), for de-duplication.
    pub delivery_id: String,
    /// The frame, exactly as pushed.
    pub frame: OutboundFrame,
    /// The users whose connections get it.
    pub users: Vec<String>,
}

/// A body that is not a batch of this version.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed cluster batch")]
pub struct Malformed;

/// The bytes `copy` takes in a body.
pub fn encoded_len(copy: &DeliveryCopy) -> usize {
    10 + copy.delivery_id.len()
        + copy.frame.len()
        + copy.users.iter().map(|user| 4 + user.len()).sum::<usize>()
}

/// Encodes copies into one message body.
pub fn encode(copies: &[&DeliveryCopy]) -> Vec<u8> {
    let size: usize = copies.iter().copied().map(encoded_len).sum();
    let mut body = Vec::with_capacity(5 + size);
    body.push(VERSION);
    body.extend_from_slice(&len_u32(copies.len()).to_be_bytes());
    for copy in copies {
        put_str(&mut body, &copy.delivery_id);
        let users = u16::try_from(copy.users.len()).unwrap_or(u16::MAX);
        body.extend_from_slice(&users.to_be_bytes());
        for user in copy.users.iter().take(usize::from(users)) {
            put_str(&mut body, user);
        }
        put_bytes(&mut body, copy.frame.as_bytes());
    }
    body
}

/// Decodes a message body.
pub fn decode(body: &[u8]) -> Result<Vec<DeliveryCopy>, Malformed> {
    let mut reader = Reader { rest: body };
    if reader.take(1)? != [VERSION] {
        return Err(Malformed);
    }
    let count = reader.u32()?;
    let mut copies = Vec::new();
    for _ in 0..count {
        let delivery_id = reader.string()?;
        let users = u16::from_be_bytes(reader.take(2)?.try_into().map_err(|_| Malformed)?);
        let users = (0..users)
            .map(|_| reader.string())
            .collect::<Result<_, _>>()?;
        let frame = reader.string()?.into();
        copies.push(DeliveryCopy {
            delivery_id,
            frame,
            users,
        });
    }
    if reader.rest.is_empty() {
        Ok(copies)
    } else {
        Err(Malformed)
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("cluster batches stay far below 4 GiB")
}

fn put_str(body: &mut Vec<u8>, text: &str) {
    put_bytes(body, text.as_bytes());
}

fn put_bytes(body: &mut Vec<u8>, bytes: &[u8]) {
    body.extend_from_slice(&len_u32(bytes.len()).to_be_bytes());
    body.extend_from_slice(bytes);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.rest.len() < n {
            return Err(Malformed);
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| Malformed)?,
        ))
    }

    fn string(&mut self) -> Result<String, Malformed> {
        let len = usize::try_from(self.u32()?).map_err(|_| Malformed)?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(id: &str, users: &[&str], frame: &str) -> DeliveryCopy {
        DeliveryCopy {
            delivery_id: id.to_owned(),
            frame: frame.into(),
            users: users.iter().map(|user| (*user).to_owned()).collect(),
        }
    }

    #[test]
    fn a_batch_decodes_to_what_was_encoded() {
        let copies = vec![
            copy("d1", &["u1", "ü2"], r#"{"event":"message","data":"é\"x"}"#),
            copy("d2", &["u3"], "{}"),
        ];
        assert_eq!(
            decode(&encode(&copies.iter().collect::<Vec<_>>())),
            Ok(copies)
        );
        assert_eq!(decode(&encode(&[])), Ok(Vec::new()));
    }

    #[test]
    fn truncated_or_foreign_bodies_are_refused() {
        let body = encode(&[&copy("d1", &["u1"], "{}")]);
        for cut in 0..body.len() {
            assert_eq!(decode(&body[..cut]), Err(Malformed), "cut at {cut}");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(Malformed));
        assert_eq!(decode(b"{\"event\":\"x\"}"), Err(Malformed));
    }
}
