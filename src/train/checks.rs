//! What a sweep checks before it trains: that the training and validation features agree,
//! the split's digest, and that a resumed run has the configuration it was started with.

use super::*;

pub(super) fn check_sets(train: &FeatureSet, val: &FeatureSet) -> Result<()> {
    if train.is_empty() {
        return Err(Error::invalid(
            "training split",
            "has no samples (check the image limit and the validation count)",
        ));
    }
    if val.is_empty() {
        return Err(Error::invalid(
            "validation split",
            "has no samples, and validation picks the best checkpoint (check the validation count and the image limit)",
        ));
    }
    if train.extractor != val.extractor {
        return Err(Error::invalid(
            "features",
            format!(
                "training features come from `{}`, validation features from `{}`",
                train.extractor, val.extractor
            ),
        ));
    }
    if train.classes != val.classes {
        return Err(Error::invalid(
            "features",
            format!(
                "training features are labelled with the classes {:?}, validation features \
                 with {:?}",
                train.classes, val.classes
            ),
        ));
    }
    if train.classes.len() < 2 {
        return Err(Error::invalid(
            "features",
            format!(
                "a classifier needs at least 2 classes, these features name {:?}",
                train.classes
            ),
        ));
    }
    for (name, set) in [("training", train), ("validation", val)] {
        if set.dim == 0 || set.dim != train.dim || set.features.len() != set.len() * set.dim {
            return Err(Error::invalid(
                "features",
                format!(
                    "{name} features hold {} values for {} rows of width {} (training width {})",
                    set.features.len(),
                    set.len(),
                    set.dim,
                    train.dim
                ),
            ));
        }
        if let Some(bad) = set
            .labels
            .iter()
            .find(|&&y| y as usize >= train.classes.len())
        {
            return Err(Error::invalid(
                "labels",
                format!(
                    "{name} label {bad} is not a class id (there are {} classes)",
                    train.classes.len()
                ),
            ));
        }
    }
    Ok(())
}

/// sha256 over both splits' image indices and labels (`config.json`'s `split_digest`).
pub fn split_digest(train: &FeatureSet, val: &FeatureSet) -> String {
    let mut h = Sha256::new();
    for set in [train, val] {
        h.update((set.len() as u64).to_le_bytes());
        for &i in &set.index {
            h.update(i.to_le_bytes());
        }
        h.update(&set.labels);
    }
    crate::io::hex(&h.finalize())
}

/// Rejects a resumed run whose configuration differs, naming the first differing field.
pub(super) fn compare_configs(path: &Path, old: &RunConfig, new: &RunConfig) -> Result<()> {
    if old.extractor != new.extractor || old.feature_dim != new.feature_dim {
        return Err(Error::Fingerprint {
            path: path.to_path_buf(),
            msg: format!(
                "the run was trained on features from `{}`, these come from `{}`",
                old.extractor, new.extractor
            ),
        });
    }
    if old.split_digest != new.split_digest {
        return Err(Error::Fingerprint {
            path: path.to_path_buf(),
            msg: "the training/validation split differs (check the validation count, the split seed and the image limit)"
                .to_string(),
        });
    }
    // `source` is informative (paths may be spelled differently); the fingerprint and the
    // split digest above are what identify the features.
    let new = RunConfig {
        source: old.source.clone(),
        options: old.options.clone(),
        ..new.clone()
    };
    if *old == new {
        return Ok(());
    }
    let (a, b) = (to_value(old), to_value(&new));
    let field = first_difference("", &a, &b).unwrap_or_else(|| "?".to_string());
    Err(Error::invalid(
        "resume",
        format!(
            "{} was made with a different `{field}`; resume with the same settings or start a new run directory",
            path.display()
        ),
    ))
}

fn to_value(c: &RunConfig) -> serde_json::Value {
    serde_json::to_value(c).unwrap_or(serde_json::Value::Null)
}

pub(super) fn first_difference(
    prefix: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match y.get(k) {
                    Some(vb) => {
                        if let Some(d) = first_difference(&path, va, vb) {
                            return Some(d);
                        }
                    }
                    None => return Some(path),
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{prefix}.{k}"))
        }
        _ if a == b => None,
        _ => Some(prefix.to_string()),
    }
}
