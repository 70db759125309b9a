//! Fuzzes chat-template rendering: the input is a template, then (after a NUL byte) message
//! texts separated by NUL bytes. Any template must render or return an error within the
//! renderer's fuel and output limits.
#![no_main]

use ember::tokenizer::{render_chat_template, ChatMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or("");
    let roles = ["system", "user", "assistant"];
    let messages: Vec<ChatMessage> = parts.take(8).enumerate().map(|(i, c)| ChatMessage::new(roles[i % 3], c)).collect();
    for add_generation_prompt in [false, true] {
        let _ = render_chat_template(template, &messages, add_generation_prompt, "<s>", "</s>");
    }
});
