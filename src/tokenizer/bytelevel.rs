//! GPT-2's reversible byte-to-unicode map: printable Latin-1 bytes stand for themselves, the other
//! 68 bytes (controls, space, DEL, NBSP, soft hyphen...) are shifted to U+0100.. in byte order.

fn printable(b: u32) -> bool {
    (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
}

/// The byte a byte-level character stands for.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    if printable(c) {
        return Some(c as u8);
    }
    // The shifted bytes in order: 0x00..=0x20 (33), 0x7f..=0xa0 (34), 0xad (1).
    match c.checked_sub(256)? {
        n @ 0..=32 => Some(n as u8),
        n @ 33..=66 => Some((0x7f + n - 33) as u8),
        67 => Some(0xad),
        _ => None,
    }
}

/// A token's byte-level text back to bytes; a character outside the map becomes the marker
/// llama.cpp writes (`[UNK_BYTE_0x<utf-8 hex><token text>]`).
pub(crate) fn decode_text(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_bytes() {
        let mut n = 0;
        for b in 0u32..256 {
            let c = if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
            assert_eq!(char_to_byte(c), Some(b as u8));
        }
        assert_eq!(n, 68);
        assert_eq!(char_to_byte('Ġ'), Some(b' '));
        assert_eq!(char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(char_to_byte('\u{200}'), None);
    }
}
