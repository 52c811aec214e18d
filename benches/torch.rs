//! The decode step of Kiln beside the PyTorch reference (`reference/torch`), on the same weights, in
//! one run: `kiln bench --against-torch`. The reference runs in a Python child process that times
//! steps on request, so the two sides alternate round by round and share the machine's noise; medians
//! and ratios come from the same rounds.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_model::{CandleEngine, Engine};

use crate::{decode_fixture, fixture_context};

/// The reference's sources, embedded so that the binary runs them from any directory.
const KILN_TORCH_PY: &str = include_str!("../reference/torch/kiln_torch.py");
const BENCH_DECODE_PY: &str = include_str!("../reference/torch/bench_decode.py");

/// How the reference runs its step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchMode {
    /// Eager PyTorch over a preallocated cache with `scaled_dot_product_attention`.
    Eager,
    /// The same step under `torch.compile` (compiled in an untimed warm-up).
    Compile,
}

impl TorchMode {
    pub fn name(self) -> &'static str {
        match self {
            TorchMode::Eager => "eager",
            TorchMode::Compile => "compile",
        }
    }
}

/// The Python interpreter with torch: `KILN_TORCH_PYTHON`, else the virtual environment that
/// `scripts/torch-venv.sh` makes.
pub fn default_torch_python() -> PathBuf {
    if let Some(python) = std::env::var_os("KILN_TORCH_PYTHON") {
        return python.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/kiln/torch-venv/bin/python")
}

/// A running reference process that times decode steps of one model.
pub struct TorchDecode {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub mode: TorchMode,
    /// What the reference announced: torch's version and its threads.
    pub announced: serde_json::Value,
    _sources: tempfile::TempDir,
}

fn io_error(message: String) -> std::io::Error {
    std::io::Error::other(message)
}

impl TorchDecode {
    /// Starts the reference on `model_dir` with `threads` intra-op threads.
    pub fn start(
        python: &Path,
        model_dir: &Path,
        threads: usize,
        mode: TorchMode,
    ) -> std::io::Result<Self> {
        let sources = tempfile::tempdir()?;
        std::fs::write(sources.path().join("kiln_torch.py"), KILN_TORCH_PY)?;
        std::fs::write(sources.path().join("bench_decode.py"), BENCH_DECODE_PY)?;
        let mut child = Command::new(python)
            .arg(sources.path().join("bench_decode.py"))
            .arg("--model")
            .arg(model_dir)
            .args(["--threads", &threads.to_string(), "--mode", mode.name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| io_error(format!("starting {}: {e}", python.display())))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut torch = TorchDecode {
            child,
            stdin,
            stdout,
            mode,
            announced: serde_json::Value::Null,
            _sources: sources,
        };
        torch.announced = torch.read_reply()?;
        if torch.announced["ready"] != true {
            return Err(io_error(format!(
                "the reference did not start: {}",
                torch.announced
            )));
        }
        Ok(torch)
    }

    fn read_reply(&mut self) -> std::io::Result<serde_json::Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(io_error(
                "the reference exited (its errors are above)".into(),
            ));
        }
        serde_json::from_str(&line)
            .map_err(|e| io_error(format!("the reference answered {line:?}: {e}")))
    }

    /// Times `steps` decode steps of a batch of `batch` sequences holding `context` tokens.
    pub fn steps(
        &mut self,
        batch: usize,
        context: usize,
        steps: usize,
    ) -> std::io::Result<Vec<Duration>> {
        let request = serde_json::json!({"batch": batch, "context": context, "steps": steps});
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        let reply = self.read_reply()?;
        let times = reply["step_ms"]
            .as_array()
            .ok_or_else(|| io_error(format!("the reference failed: {reply}")))?;
        Ok(times
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
            .collect())
    }
}

impl Drop for TorchDecode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `steps` decode steps of Kiln's engine over a fresh fixture batch, each timed alone.
pub fn kiln_steps(engine: &mut CandleEngine, batch: usize, steps: usize) -> Vec<Duration> {
    let ids = decode_fixture(engine, batch, 128, CONTEXT_FILL);
    let times = (0..steps)
        .map(|_| {
            let start = Instant::now();
            engine.decode(&ids, 1).expect("decode step");
            start.elapsed()
        })
        .collect();
    engine.release(&ids);
    times
}

/// How far into a 128x128 image the compared steps run (context of about 160 tokens).
pub const CONTEXT_FILL: f64 = 0.4;

/// Median step times of one batch size: Kiln's, then each reference mode's.
#[derive(Debug, Clone)]
pub struct ComparisonRow {
    pub batch: usize,
    pub kiln: Duration,
    pub torch: Vec<(TorchMode, Duration)>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Alternates Kiln and every reference, `rounds` times over `batches`, `steps` steps each time;
/// returns each batch size's medians over all rounds.
pub fn compare_decode(
    engine: &mut CandleEngine,
    references: &mut [TorchDecode],
    batches: &[usize],
    steps: usize,
    rounds: usize,
) -> std::io::Result<Vec<ComparisonRow>> {
    let context = fixture_context(&engine.info(), 128, CONTEXT_FILL);
    let mut kiln: Vec<Vec<Duration>> = vec![Vec::new(); batches.len()];
    let mut torch: Vec<Vec<Vec<Duration>>> =
        vec![vec![Vec::new(); references.len()]; batches.len()];
    for _ in 0..rounds {
        for (b, &batch) in batches.iter().enumerate() {
            kiln[b].extend(kiln_steps(engine, batch, steps));
            for (r, reference) in references.iter_mut().enumerate() {
                torch[b][r].extend(reference.steps(batch, context, steps)?);
            }
        }
    }
    Ok(batches
        .iter()
        .zip(kiln.into_iter().zip(torch))
        .map(|(&batch, (kiln, torch))| ComparisonRow {
            batch,
            kiln: median(kiln),
            torch: references
                .iter()
                .zip(torch)
                .map(|(r, times)| (r.mode, median(times)))
                .collect(),
        })
        .collect())
}
