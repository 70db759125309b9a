//! Fuzzes the GGUF reader: any input must parse or return an error, never panic, and a file that
//! parses must let every tensor's data and every metadata value be read.
#![no_main]

use ember::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    let len = f.bytes().len() as u64;
    let mut sum = 0u64;
    for t in f.tensors() {
        let d = f.tensor_data(t);
        assert_eq!(d.len() as u64, t.n_bytes);
        assert!(t.offset >= f.data_offset && t.offset + t.n_bytes <= len);
        assert!(t.offset % f.alignment == 0);
        assert_eq!(t.ty.bytes_for(t.n_elements()), Some(t.n_bytes));
        let _ = t.rows_cols();
        sum = sum.wrapping_add(d.first().copied().unwrap_or(0) as u64);
        assert!(std::ptr::eq(f.tensor(&t.name).unwrap(), t));
    }
    for (k, v) in f.metadata() {
        sum = sum.wrapping_add(v.summary().len() as u64);
        let _ = (v.as_u64(), v.as_i64(), v.as_f64(), v.as_str(), v.as_bool(), v.as_array());
        assert!(f.get(k).is_some());
        let _ = (f.get_u64(k), f.get_f32(k), f.get_str(k));
    }
    std::hint::black_box(sum);
});
