//! Workloads built from `data/sentences.tsv`, deterministically (the same
//! texts on every run and every machine, so runs can be compared).
//!
//! - [`mixed`]: single sentences and paragraphs of several, 4 to 110 words —
//!   what RAG indexing sends (chunks of a document).
//! - [`short`]: 3 to 14 words — search queries, titles.
//! - [`tensor_input`]: the input of the `sigmoid` tensor model (a
//!   `[3, 4, 5]` float tensor): almost no compute, so a run of it measures
//!   the pipeline's own cost per job.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

/// `data/sentences.tsv`, built into the binary: an installed `sluice-load`
/// needs no checkout.
pub const SENTENCES_TSV: &str = include_str!("../data/sentences.tsv");

/// The `topic<TAB>sentence` lines of `path`, or the built-in corpus.
pub fn corpus_text(path: Option<&Path>) -> anyhow::Result<String> {
    match path {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())),
        None => Ok(SENTENCES_TSV.to_owned()),
    }
}

/// `topic<TAB>sentence` lines → sentences.
pub fn sentences(text: &str) -> anyhow::Result<Vec<String>> {
    let out: Vec<String> = text.lines().filter_map(|l| l.split_once('\t')).map(|(_, s)| s.trim().to_owned()).collect();
    anyhow::ensure!(out.len() >= 2, "fewer than two sentences in the corpus");
    Ok(out)
}

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `n` texts of 4 to 110 words: a fifth single sentences, the rest
/// paragraphs of 2 to 8 sentences cut at 110 words.
pub fn mixed(sentences: &[String], n: usize) -> Vec<String> {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            if rng.below(5) == 0 {
                return sentences[rng.below(sentences.len())].clone();
            }
            let parts = 2 + rng.below(7);
            let words: Vec<&str> =
                (0..parts).flat_map(|_| sentences[rng.below(sentences.len())].split_whitespace()).take(110).collect();
            words.join(" ")
        })
        .collect()
}

/// `n` texts of 3 to 14 words: windows of the sentences.
pub fn short(sentences: &[String], n: usize) -> Vec<String> {
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            let words: Vec<&str> = sentences[rng.below(sentences.len())].split_whitespace().collect();
            let len = (3 + rng.below(12)).min(words.len());
            let start = rng.below(words.len() - len + 1);
            words[start..start + len].join(" ")
        })
        .collect()
}

/// `n` distinct texts, each a window of 3 to 14 words of one sentence
/// followed by a window of another: the search benchmark's documents.
pub fn pairs(sentences: &[String], n: usize) -> Vec<String> {
    let mut rng = Rng::new(0x5851_f42d_4c95_7f2d);
    let window = |rng: &mut Rng, s: &str| {
        let words: Vec<&str> = s.split_whitespace().collect();
        let len = (3 + rng.below(12)).min(words.len());
        let start = rng.below(words.len() - len + 1);
        words[start..start + len].join(" ")
    };
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    // Enough tries for any n the corpus can give; fewer texts otherwise.
    for _ in 0..n.saturating_mul(20) {
        if out.len() == n || sentences.len() < 2 {
            break;
        }
        let a = rng.below(sentences.len());
        let b = (a + 1 + rng.below(sentences.len() - 1)) % sentences.len();
        let text = format!("{} {}", window(&mut rng, &sentences[a]), window(&mut rng, &sentences[b]));
        if seen.insert(text.clone()) {
            out.push(text);
        }
    }
    out
}

/// The `i`-th input of the `sigmoid` model: 60 values in [-4, 4].
pub fn tensor_input(i: usize) -> Value {
    let mut rng = Rng::new(0x1234_5678 ^ (i as u64).wrapping_mul(0x9e37_79b9));
    let data: Vec<f64> = (0..60).map(|_| (rng.below(8001) as f64 - 4000.0) / 1000.0).collect();
    json!({"tensors": {"x": {"dtype": "float32", "shape": [3, 4, 5], "data": data}}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(t: &str) -> usize {
        t.split_whitespace().count()
    }

    #[test]
    fn corpora_have_the_documented_lengths_and_are_deterministic() {
        let s = sentences(SENTENCES_TSV).unwrap();
        let m = mixed(&s, 500);
        assert!(m.iter().all(|t| (4..=110).contains(&words(t))), "mixed: 4..=110 words");
        assert!(m.iter().any(|t| words(t) > 60), "mixed has long paragraphs");
        assert_eq!(m, mixed(&s, 500));
        let q = short(&s, 500);
        assert!(q.iter().all(|t| (3..=14).contains(&words(t))), "short: 3..=14 words");
        assert_eq!(q, short(&s, 500));
        assert_eq!(tensor_input(7), tensor_input(7));
        assert_ne!(tensor_input(7), tensor_input(8));
        assert_eq!(tensor_input(0)["tensors"]["x"]["data"].as_array().unwrap().len(), 60);
    }
}
