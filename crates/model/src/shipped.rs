//! The model Kiln ships: `kiln-shapes`, trained by `kiln train` on procedural scenes of coloured
//! shapes (see `crates/train`), embedded in the binary so that `kiln up` draws the prompt it is given
//! on any machine without a download. `install` writes it where a worker loads models from.

use std::path::Path;

use crate::ModelError;

/// `config.json` of the shipped model.
pub const CONFIG: &str = include_str!("../shipped/kiln-shapes/config.json");
/// `model.safetensors` of the shipped model.
pub const WEIGHTS: &[u8] = include_bytes!("../shipped/kiln-shapes/model.safetensors");

/// Writes the shipped model into `dir` unless an identical copy is there; returns whether it wrote.
pub fn install(dir: &Path) -> Result<bool, ModelError> {
    let config = dir.join("config.json");
    let weights = dir.join("model.safetensors");
    let same = std::fs::read(&config).is_ok_and(|c| c == CONFIG.as_bytes())
        && std::fs::read(&weights).is_ok_and(|w| w == WEIGHTS);
    if same {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(ModelError::io(dir))?;
    // Written beside and renamed, so a concurrent start never loads half a file.
    for (path, bytes) in [(&weights, WEIGHTS), (&config, CONFIG.as_bytes())] {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(ModelError::io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(ModelError::io(path))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelConfig, Transformer};

    #[test]
    fn the_shipped_model_installs_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("kiln-shapes");
        assert!(install(&at).unwrap());
        assert!(!install(&at).unwrap(), "an identical copy is kept");
        let model = Transformer::load(&at, &crate::transformer::Device::Cpu).unwrap();
        let cfg: ModelConfig = serde_json::from_str(CONFIG).unwrap();
        assert_eq!(model.config(), &cfg);
        assert!(
            WEIGHTS.len() <= 20 * 1024 * 1024,
            "the shipped model stays under 20 MB"
        );
    }
}
