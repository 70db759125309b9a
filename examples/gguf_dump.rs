//! Prints a GGUF file's metadata and tensor table: `cargo run --example gguf_dump FILE`.
fn main() {
    let path = std::env::args().nth(1).expect("usage: gguf_dump FILE");
    let f = ember::gguf::GgufFile::open(&path).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    println!("{:?} v{} alignment {} data at {}", f.magic, f.version, f.alignment, f.data_offset);
    for (k, v) in f.metadata() {
        println!("{k} = {}", v.summary());
    }
    for t in f.tensors() {
        println!("{:32} {:6} {:?} @{}", t.name, t.ty, t.dims, t.offset);
    }
}
