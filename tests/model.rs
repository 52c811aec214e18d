//! The shipped model draws what the prompt says: `kiln eval` generates held-out prompts through the
//! serving engine and the scene checker scores them (a random model scores about 0 %), and the main
//! job (`kiln up --generate`) draws a prompt the checker accepts. Thresholds sit below the figures
//! measured when the model was trained (docs/training.md), so a regression in the model, the engine,
//! sampling or the codebook fails here.

use std::path::Path;
use std::process::Command;

use kiln_e2e::kiln_bin;

fn shipped() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/model/shipped/kiln-shapes")
}

/// `kiln eval` of the shipped model with `args`: its JSON figures and its output.
fn eval_shipped(args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("eval.json");
    let out = Command::new(kiln_bin())
        .args(["eval", "--batch", "16", "--model"])
        .arg(shipped())
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kiln eval {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (figures, stdout)
}

#[test]
fn the_shipped_model_binds_colours_to_shapes_on_held_out_prompts() {
    let (figures, stdout) = eval_shipped(&["--per-count", "16"]);
    for (objects, images, objects_right) in THRESHOLDS {
        let accuracy = figures[format!("accuracy_{objects}")].as_f64().unwrap();
        let right = figures[format!("objects_right_{objects}")]
            .as_f64()
            .unwrap();
        assert!(
            accuracy >= images && right >= objects_right,
            "{objects} object(s): {:.0} % of images and {:.0} % of objects right, expected at \
             least {:.0} % and {:.0} %\n{stdout}",
            accuracy * 100.0,
            right * 100.0,
            images * 100.0,
            objects_right * 100.0
        );
    }
}

/// (objects in the prompt, least share of 16 held-out prompts drawn wholly right, least share of
/// their objects right), at the model's sampling defaults (temperature 0.3, top-k 8, guidance
/// 1.5). Measured for kiln-shapes 0.5.0 at this seed: images 100 / 100 / 93.8 / 100 %, objects 100
/// / 100 / 100 / 100 % (0.4.0: 87.5 / 93.8 / 87.5 / 93.8 and 93.8 / 96.9 / 97.9 / 98.4 %; 0.3.0:
/// 62.5 / 81.2 / 75.0 / 81.2 and 68.8 / 87.5 / 91.7 / 95.3 %; a random model: about 0; on 200
/// prompts per count: 95.5 / 99.0 / 95.5 / 94.0 %). The floors leave room for another CPU's
/// rounding to change a few samples.
const THRESHOLDS: [(usize, f64, f64); 4] =
    [(1, 0.8, 0.85), (2, 0.8, 0.9), (3, 0.75, 0.9), (4, 0.7, 0.9)];

/// The README's prompt through `kiln up --generate`, at a fixed seed (images are deterministic in
/// prompt and seed), at the model's sampling defaults: the checker must find exactly what the prompt
/// says. Not every seed draws it (seed 1 leaves the star out); how often it is drawn is
/// `the_readme_prompt_is_drawn_most_times`.
#[test]
fn the_main_job_draws_the_readme_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("kiln.png");
    let prompt = "a red triangle above a blue star";
    let out = Command::new(kiln_bin())
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--seed",
            "3",
            "--generate",
            prompt,
        ])
        .arg("--output")
        .arg(&png)
        .arg("--data-dir")
        .arg(dir.path())
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln up --generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = kiln_scenes::from_png(&std::fs::read(&png).unwrap()).unwrap();
    let spec = kiln_scenes::parse_caption(prompt).unwrap();
    let result = kiln_scenes::check(&image, &spec, kiln_scenes::SceneSet::Classic);
    assert!(
        result.correct,
        "the image shows {:?} for {prompt:?}",
        kiln_scenes::detect(&image)
    );
}

/// How often the README's prompt comes out exactly, over 64 seeds (`kiln eval --prompt`): measured
/// 94.1 % over 256 seeds for kiln-shapes 0.5.0 (93.8 % over these 64; 0.4.0: 91.4 %, 0.3.0: 72.7 %,
/// 0.2.0: 86.3 %).
#[test]
fn the_readme_prompt_is_drawn_most_times() {
    let (figures, stdout) = eval_shipped(&[
        "--per-count",
        "64",
        "--prompt",
        "a red triangle above a blue star",
    ]);
    let accuracy = figures["prompt_accuracy"].as_f64().unwrap();
    assert!(
        accuracy >= 0.85,
        "drawn exactly {:.0} % of times: {stdout}",
        accuracy * 100.0
    );
}
