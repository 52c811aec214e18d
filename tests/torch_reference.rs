//! Logits parity with the PyTorch reference (`reference/torch`): Kiln's transformer and an
//! independent PyTorch implementation of the same model, reading the same `config.json` and
//! `model.safetensors`, give the same logits for the same inputs. Kiln runs several sequences of
//! different lengths in one batch over its paged KV cache (a prefill, then greedy decode steps); the
//! reference recomputes each sequence alone over a contiguous cache. Both compute in f32 with other
//! summation orders, so they agree to a tolerance (stated below), not bit for bit, and the most likely
//! code of every call must be the same.
//!
//! The reference needs `torch` (CPU): `scripts/test.sh` installs it in a virtual environment
//! (`scripts/torch-venv.sh`) and points `KILN_TORCH_PYTHON` at its interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_model::kv_cache::PagedKvCache;
use kiln_model::tokenizer::{code_token, prefix_tokens, BOI};
use kiln_model::transformer::{Device, Position, SequenceInput, TokenInput};
use kiln_model::{ModelConfig, Transformer};

/// Largest difference allowed between a Kiln logit and the reference's: `ATOL + RTOL * |logit|`.
/// f32 sums over a few hundred terms in another order differ by about 1e-6 relative; 1e-4 leaves
/// room for that and nothing else (a wrong scale, mask or norm moves logits by 1e-2 or more).
const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../reference/torch")
}

/// The Python interpreter with torch: `KILN_TORCH_PYTHON`, else the virtual environment that
/// `scripts/torch-venv.sh` makes.
fn torch_python() -> PathBuf {
    if let Some(python) = std::env::var_os("KILN_TORCH_PYTHON") {
        return python.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let venv = Path::new(&home).join(".cache/kiln/torch-venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with torch: run scripts/torch-venv.sh (scripts/test.sh does) or set KILN_TORCH_PYTHON"
    );
    venv
}

/// One sequence's forward calls as the fixture records them.
#[derive(Default)]
struct Recorded {
    calls: Vec<serde_json::Value>,
}

fn rows(tokens: &[TokenInput]) -> Vec<[usize; 4]> {
    tokens
        .iter()
        .map(|t| match t.position {
            Position::Text(i) => [t.token as usize, 0, i, 0],
            Position::Image { row, col } => [t.token as usize, 1, row, col],
        })
        .collect()
}

fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap() as u32
}

/// Runs `prompts` through Kiln in one batch (prefill with the first image input, then `steps`
/// greedy decode steps) and writes the fixture the reference checks; returns its path.
fn record(model_dir: &Path, prompts: &[&str], steps: usize, out: &Path) -> PathBuf {
    let model = Transformer::load(model_dir, &Device::Cpu).unwrap();
    let cfg: ModelConfig = model.config().clone();
    let size = cfg.default_size;
    let cols = size as usize / cfg.patch_size;
    let block_size = 16;
    let per_seq = (cfg.max_prefix_tokens() + steps + 2).div_ceil(block_size);
    let mut cache = PagedKvCache::new(
        cfg.n_layers,
        per_seq * prompts.len(),
        block_size,
        cfg.d_model,
    );
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let image = |index: usize, code: Option<u32>| TokenInput {
        token: code.map_or(BOI, |c| code_token(&cfg, c)),
        position: Position::Image {
            row: index / cols,
            col: index % cols,
        },
    };
    let mut cached = vec![0usize; prompts.len()];
    let mut next: Vec<Vec<TokenInput>> = prompts
        .iter()
        .map(|p| {
            let mut t: Vec<TokenInput> = prefix_tokens(&cfg, p, size, size)
                .into_iter()
                .enumerate()
                .map(|(i, token)| TokenInput {
                    token,
                    position: Position::Text(i),
                })
                .collect();
            t.push(image(0, None));
            t
        })
        .collect();
    let mut recorded: Vec<Recorded> = prompts.iter().map(|_| Recorded::default()).collect();
    for step in 0..=steps {
        let inputs: Vec<SequenceInput> = next
            .iter()
            .zip(&tables)
            .zip(&cached)
            .map(|((tokens, table), &cached)| SequenceInput {
                tokens: tokens.clone(),
                cached,
                block_table: table,
            })
            .collect();
        let logits = model.forward(&inputs, &mut cache).unwrap();
        for s in 0..prompts.len() {
            recorded[s].calls.push(serde_json::json!({
                "tokens": rows(&next[s]),
                "logits": logits[s],
            }));
            cached[s] += next[s].len();
            next[s] = vec![image(step + 1, Some(argmax(&logits[s])))];
        }
    }
    let fixture = serde_json::json!({
        "model_dir": model_dir,
        "sequences": recorded.iter().map(|r| serde_json::json!({"calls": r.calls})).collect::<Vec<_>>(),
    });
    std::fs::write(out, serde_json::to_vec(&fixture).unwrap()).unwrap();
    out.to_path_buf()
}

/// Runs the reference's parity check on `fixture`; returns its JSON verdict and whether it passed.
fn check(fixture: &Path) -> (serde_json::Value, bool) {
    let out = Command::new(torch_python())
        .arg(reference_dir().join("parity.py"))
        .arg(fixture)
        .args(["--atol", &ATOL.to_string(), "--rtol", &RTOL.to_string()])
        .output()
        .expect("running the PyTorch reference");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the reference printed no verdict ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // The measured differences, for the notes that quote the tolerance's margin.
    eprintln!("parity verdict: {verdict}");
    (verdict, out.status.success())
}

const PROMPTS: [&str; 3] = [
    "a red triangle above a blue star",
    "a green circle",
    "a yellow square left of a red circle, a blue star below",
];

#[test]
fn the_shipped_model_gives_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/model/shipped/kiln-shapes");
    let fixture = record(&shipped, &PROMPTS, 6, &dir.path().join("fixture.json"));
    let (verdict, passed) = check(&fixture);
    assert!(passed, "Kiln and PyTorch disagree: {verdict}");
    assert_eq!(verdict["calls"], 21, "{verdict}");
}

#[test]
fn a_20m_model_gives_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    Transformer::init_random(&ModelConfig::random_20m(), 11, &model).unwrap();
    let fixture = record(&model, &PROMPTS[..2], 3, &dir.path().join("fixture.json"));
    let (verdict, passed) = check(&fixture);
    assert!(passed, "Kiln and PyTorch disagree: {verdict}");
}

/// The check can fail: logits off by more than the tolerance are reported as a disagreement.
#[test]
fn the_reference_refuses_logits_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/model/shipped/kiln-shapes");
    let path = record(&shipped, &PROMPTS[..1], 1, &dir.path().join("fixture.json"));
    let mut fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let logit = &mut fixture["sequences"][0]["calls"][1]["logits"][7];
    *logit = serde_json::json!(logit.as_f64().unwrap() + 0.01);
    std::fs::write(&path, serde_json::to_vec(&fixture).unwrap()).unwrap();
    let (verdict, passed) = check(&path);
    assert!(!passed, "a logit moved by 0.01 passed: {verdict}");
    assert_eq!(
        verdict["failures"].as_array().unwrap().len(),
        1,
        "{verdict}"
    );
}
