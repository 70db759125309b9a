//! Fuzzes loading a model from a GGUF image: hyper-parameter validation, tensor shapes and
//! types, the load-time conversions, and the tokenizer built from the file's metadata, which
//! then encodes and decodes the input's own bytes. Any input must load or return an error.
#![no_main]

use ember::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    let f = Arc::new(f);
    if let Ok(tok) = ember::tokenizer::Tokenizer::from_gguf(&f) {
        // Bounded, so that a large input stays a fast execution.
        let text = String::from_utf8_lossy(&data[..data.len().min(512)]);
        for (add_special, parse_special) in [(true, true), (false, false)] {
            if let Ok(ids) = tok.encode(&text, add_special, parse_special) {
                let _ = tok.decode(&ids, true);
                for &id in ids.iter().take(64) {
                    let _ = (tok.token_bytes(id, false), tok.is_eog(id), tok.token_text(id));
                }
            }
        }
        let _ = tok.decode(&[0, 1, 2, u32::MAX], false);
    }
    if let Ok(m) = ember::model::Model::from_gguf(f) {
        let hp = &m.hp;
        assert!(hp.n_layer > 0 && hp.n_embd > 0 && hp.n_ff > 0 && hp.rope_freq_scale.is_finite());
        let _ = m.weight_bytes();
        let _ = m.token_embd.row_f32(0);
    }
});
