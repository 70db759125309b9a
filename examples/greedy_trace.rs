//! Greedy decoding that prints each step's top-2 tokens and their margin, to locate and judge a
//! divergence from another engine: `cargo run --release --example greedy_trace MODEL PROMPT [N]`.
use ember::engine::{Forward, Logits, Session};
use std::sync::Arc;

fn main() {
    let mut args = std::env::args().skip(1);
    let (path, prompt) = (args.next().expect("MODEL"), args.next().expect("PROMPT"));
    let n: usize = args.next().map_or(48, |s| s.parse().expect("N"));
    let model = Arc::new(ember::model::Model::load(&path).expect("model"));
    let tok = ember::tokenizer::Tokenizer::from_gguf(&model.file).expect("tokenizer");
    let ids = tok.encode(&prompt, true, true).expect("encode");
    let mut s = Session::new(model, ids.len() + n + 1);
    let mut logits = s.forward(&ids, Logits::Last).expect("forward");
    for step in 0..n {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let (a, b) = (idx[0], idx[1]);
        println!("{step:3} {a:6} {:9.4} | {b:6} {:9.4} | margin {:.4} {:?}", logits[a], logits[b], logits[a] - logits[b], tok.decode(&[a as u32], true));
        logits = s.forward(&[a as u32], Logits::Last).expect("forward");
    }
}
