//! Which images make up the train, validation and test splits.
//!
//! A dataset brings some of its [`Part`]s (CIFAR: train and test; an image folder: any of
//! `train/`, `val/`, `test/`, or just one pool of images). A split the dataset has no part
//! for is drawn from the training part, seeded, so that the same options always give the
//! same images:
//!
//! - **test** first (only when the dataset has no test part), then **validation** from what
//!   is left, so that changing the validation size never moves an image into or out of the
//!   test set;
//! - **stratified** draws take the same fraction of every class (rounded per class), as
//!   scikit-learn's `train_test_split(stratify=…)` does in spirit; a plain draw (CIFAR-10's
//!   historical split, [`crate::data::cifar::split_indices`]) takes a fixed count uniformly.
//!
//! Splits are lists of image indices within their part, sorted, so that they do not depend
//! on which images later turn out to be unreadable.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::Part;
use crate::error::{Error, Result};

/// One of the three splits a run uses.
pub use crate::data::cifar::Split;

/// How many images a held-out split takes from the training part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Holdout {
    /// Exactly this many, drawn uniformly (CIFAR-10's split).
    Count(usize),
    /// This fraction of every class, rounded per class (a stratified split).
    Fraction(f64),
}

/// How the splits a dataset lacks are drawn from its training part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Validation images, when the dataset has no validation part.
    pub val: Holdout,
    /// Fraction of each class held out for testing, when the dataset has no test part.
    pub test_fraction: f64,
    /// Seed of the draws.
    pub seed: u64,
}

/// The images of one split: a part, and which of its images (`None`: all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The part the images come from.
    pub part: Part,
    /// Sorted image indices within the part; `None` for the whole part.
    pub indices: Option<Vec<usize>>,
}

/// The three splits of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    /// The training images.
    pub train: Selection,
    /// The validation images.
    pub val: Selection,
    /// The test images.
    pub test: Selection,
}

impl SplitPlan {
    /// The selection of `split`.
    pub fn get(&self, split: Split) -> &Selection {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }

    /// The parts that `splits` read from, each once, in part order.
    pub fn parts(&self, splits: &[Split]) -> Vec<Part> {
        let mut parts: Vec<Part> = splits.iter().map(|&s| self.get(s).part).collect();
        parts.sort_unstable();
        parts.dedup();
        parts
    }
}

/// The splits of a dataset that has `parts`. `train_labels` gives the labels of the
/// training part; it is called only when a split is drawn from it (so that a command that
/// needs only the test part reads only the test files).
pub fn plan<'a>(
    parts: &[Part],
    train_labels: impl FnOnce() -> Result<&'a [u8]>,
    spec: &SplitSpec,
) -> Result<SplitPlan> {
    if !parts.contains(&Part::Train) {
        return Err(Error::invalid(
            "dataset",
            "it has no training images (no train part)",
        ));
    }
    let has_val = parts.contains(&Part::Val);
    let has_test = parts.contains(&Part::Test);
    let whole = |part| Selection {
        part,
        indices: None,
    };
    if has_val && has_test {
        return Ok(SplitPlan {
            train: whole(Part::Train),
            val: whole(Part::Val),
            test: whole(Part::Test),
        });
    }
    let labels = train_labels()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
    let mut pool: Vec<usize> = (0..labels.len()).collect();
    let test = if has_test {
        whole(Part::Test)
    } else {
        let test = Holdout::Fraction(spec.test_fraction);
        let drawn = draw(
            &mut pool,
            labels,
            test,
            "test_fraction",
            spec.seed,
            &mut rng,
        )?;
        Selection {
            part: Part::Train,
            indices: Some(drawn),
        }
    };
    let val = if has_val {
        whole(Part::Val)
    } else {
        let what = match spec.val {
            Holdout::Count(_) => "val_count",
            Holdout::Fraction(_) => "val_fraction",
        };
        let drawn = draw(&mut pool, labels, spec.val, what, spec.seed, &mut rng)?;
        Selection {
            part: Part::Train,
            indices: Some(drawn),
        }
    };
    Ok(SplitPlan {
        train: Selection {
            part: Part::Train,
            indices: Some(pool),
        },
        val,
        test,
    })
}

/// Takes `holdout` images out of `pool` (sorted indices into `labels`) and returns them
/// sorted; `pool` keeps the rest, sorted. `what` names the setting in errors; a count is
/// drawn with `seed` itself (CIFAR-10's historical split), fractions from `rng`.
fn draw(
    pool: &mut Vec<usize>,
    labels: &[u8],
    holdout: Holdout,
    what: &str,
    seed: u64,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Vec<usize>> {
    let mut drawn = match holdout {
        Holdout::Count(count) => {
            if count > pool.len() {
                return Err(Error::invalid(
                    what,
                    format!(
                        "{count} images asked for, but only {} training images are left",
                        pool.len()
                    ),
                ));
            }
            // CIFAR-10's historical split: the first `count` of a seeded permutation.
            let (rest, drawn) = crate::data::cifar::split_indices(pool.len(), count, seed)?;
            let taken: Vec<usize> = drawn.iter().map(|&i| pool[i]).collect();
            *pool = rest.iter().map(|&i| pool[i]).collect();
            taken
        }
        Holdout::Fraction(fraction) => {
            if !(0.0..1.0).contains(&fraction) {
                return Err(Error::invalid(
                    what,
                    format!("{fraction} is not a fraction in [0, 1)"),
                ));
            }
            let mut by_class: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
            for &i in pool.iter() {
                by_class.entry(labels[i]).or_default().push(i);
            }
            let mut taken = Vec::new();
            for members in by_class.values_mut() {
                // Fisher–Yates over the class, then its first round(f·n) images.
                for i in (1..members.len()).rev() {
                    let j = rng.random_range(0..=i as u64) as usize;
                    members.swap(i, j);
                }
                let k = (fraction * members.len() as f64).round() as usize;
                taken.extend_from_slice(&members[..k.min(members.len())]);
            }
            taken.sort_unstable();
            let drawn: std::collections::HashSet<usize> = taken.iter().copied().collect();
            pool.retain(|i| !drawn.contains(i));
            taken
        }
    };
    drawn.sort_unstable();
    Ok(drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u8> {
        // 3 classes of 10, 20 and 30 images, interleaved.
        (0..60u32)
            .map(|i| match i % 6 {
                0 => 0,
                1 | 2 => 1,
                _ => 2,
            })
            .collect()
    }

    fn spec(val: Holdout, test_fraction: f64) -> SplitSpec {
        SplitSpec {
            val,
            test_fraction,
            seed: 3,
        }
    }

    fn count(indices: &[usize], labels: &[u8], class: u8) -> usize {
        indices.iter().filter(|&&i| labels[i] == class).count()
    }

    #[test]
    fn a_pool_is_split_stratified_into_three_disjoint_sorted_parts() {
        let labels = labels();
        let p = plan(
            &[Part::Train],
            || Ok(&labels),
            &spec(Holdout::Fraction(0.2), 0.1),
        )
        .unwrap();
        let [train, val, test] = [&p.train, &p.val, &p.test].map(|s| s.indices.clone().unwrap());
        // Per class: test round(0.1·n), then val round(0.2·rest).
        for (class, n, t, v) in [(0u8, 10, 1, 2), (1, 20, 2, 4), (2, 30, 3, 5)] {
            assert_eq!(count(&test, &labels, class), t, "class {class} test");
            assert_eq!(count(&val, &labels, class), v, "class {class} val");
            assert_eq!(
                count(&train, &labels, class),
                n - t - v,
                "class {class} train"
            );
        }
        let mut all: Vec<usize> = [train.clone(), val.clone(), test.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..60).collect::<Vec<_>>());
        for s in [&train, &val, &test] {
            assert!(s.windows(2).all(|w| w[0] < w[1]));
        }
        // Same seed, same split; another seed, another one.
        let again = plan(
            &[Part::Train],
            || Ok(&labels),
            &spec(Holdout::Fraction(0.2), 0.1),
        );
        assert_eq!(again.unwrap(), p);
        let other = plan(
            &[Part::Train],
            || Ok(&labels),
            &SplitSpec {
                seed: 4,
                ..spec(Holdout::Fraction(0.2), 0.1)
            },
        )
        .unwrap();
        assert_ne!(other.val, p.val);
    }

    #[test]
    fn changing_the_validation_size_keeps_the_test_set() {
        let labels = labels();
        let a = plan(
            &[Part::Train],
            || Ok(&labels),
            &spec(Holdout::Fraction(0.1), 0.2),
        )
        .unwrap();
        let b = plan(
            &[Part::Train],
            || Ok(&labels),
            &spec(Holdout::Fraction(0.3), 0.2),
        )
        .unwrap();
        assert_eq!(a.test, b.test);
        assert_ne!(a.val, b.val);
    }

    #[test]
    fn parts_the_dataset_has_are_used_whole_and_need_no_labels() {
        let p = plan(
            &[Part::Train, Part::Val, Part::Test],
            || panic!("the training labels are not needed"),
            &spec(Holdout::Fraction(0.1), 0.1),
        )
        .unwrap();
        assert_eq!(p.val.part, Part::Val);
        assert!(p.train.indices.is_none() && p.test.indices.is_none());
        assert_eq!(p.parts(&[Split::Test]), vec![Part::Test]);
        assert_eq!(
            p.parts(&[Split::Test, Split::Train, Split::Val]),
            vec![Part::Train, Part::Val, Part::Test]
        );
    }

    #[test]
    fn cifar_split_is_the_historical_one() {
        // A dataset with a test part and a validation count: exactly split_indices.
        let labels: Vec<u8> = (0..50).map(|i| (i % 10) as u8).collect();
        let p = plan(
            &[Part::Train, Part::Test],
            || Ok(&labels),
            &spec(Holdout::Count(7), 0.0),
        )
        .unwrap();
        let (train, val) = crate::data::cifar::split_indices(50, 7, 3).unwrap();
        assert_eq!(p.val.indices, Some(val));
        assert_eq!(p.train.indices, Some(train));
        assert_eq!(p.test.part, Part::Test);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let labels = labels();
        let e = plan(
            &[Part::Train],
            || Ok(&labels),
            &spec(Holdout::Fraction(1.0), 0.0),
        );
        assert!(e.unwrap_err().to_string().contains("val_fraction"));
        let e = plan(
            &[Part::Train, Part::Test],
            || Ok(&labels),
            &spec(Holdout::Count(61), 0.0),
        );
        assert!(e.unwrap_err().to_string().contains("61"));
        let e = plan(&[Part::Test], || Ok(&labels), &spec(Holdout::Count(1), 0.0));
        assert!(e.unwrap_err().to_string().contains("no training images"));
    }
}
