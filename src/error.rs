//! The library's error type.
//!
//! Every variant names what it is about — the file, the tensor, the flag — so that the
//! message alone tells a user what to fix. The binary prints the whole `source()` chain.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library.
///
/// New variants may be added, so matches need a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a named file or directory failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What we were doing, e.g. "reading" or "creating directory".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its content is not what its format requires.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },

    /// An image file cannot be read or decoded (names the file); a dataset may skip these.
    #[error("{}: {msg}", path.display())]
    BadImage {
        /// The image file.
        path: PathBuf,
        /// Why it cannot be used.
        msg: String,
    },

    /// A tensor is missing, unexpected or has the wrong shape (names the tensor).
    #[error("{}: {msg}", path.display())]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong, naming the tensor key and shapes involved.
        msg: String,
    },

    /// A user-supplied option or configuration value is invalid (names the flag or field).
    #[error("invalid {what}: {msg}")]
    Invalid {
        /// The setting, by its field name (e.g. `batch_size`; the command line maps it to its
        /// flag), or what else is invalid (e.g. "image").
        what: String,
        /// Why it is rejected.
        msg: String,
    },

    /// Another process holds the lock of a directory this one must write into.
    #[error(
        "{}: another process (pid {holder}) is using this {what}; wait for it to finish, or let \
         this one wait for it",
        path.display()
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// What the directory is, e.g. "training run" or "feature cache part".
        what: String,
        /// The holder's process id, as it wrote it in the lock file (may be empty).
        holder: String,
    },

    /// A cache or checkpoint was made from other inputs than the ones in use.
    #[error("{}: fingerprint mismatch: {msg}", path.display())]
    Fingerprint {
        /// The cache or checkpoint file.
        path: PathBuf,
        /// What differs.
        msg: String,
    },

    /// A download failed; the message includes the manual steps.
    #[error("{msg}")]
    Download {
        /// Which kind of failure, for callers that react to some (retry a network error,
        /// never retry a checksum mismatch).
        kind: DownloadFailure,
        /// What failed and how to do it by hand.
        msg: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// Training diverged or hit a numerical problem.
    #[error("{0}")]
    Numerical(String),

    /// Drawing or encoding a plot failed (names the plot).
    #[error("drawing the {plot} plot: {msg}")]
    Plot {
        /// The plot, e.g. "confusion_matrix".
        plot: String,
        /// What failed.
        msg: String,
    },

    /// A tensor operation failed inside candle.
    #[error("{context}")]
    Candle {
        /// What we were computing.
        context: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
}

/// The kinds of [`Error::Download`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownloadFailure {
    /// The file is missing and downloading was forbidden (offline mode).
    Offline,
    /// The server could not be reached, or the connection failed before an answer.
    Network,
    /// The server answered with this HTTP status (not 200 or 206).
    Http(u16),
    /// The server's answer broke the protocol (a wrong `Content-Range`, an unasked-for
    /// `Content-Encoding`).
    Protocol,
    /// The transfer stopped before the end; the partial file is kept for a resume.
    Interrupted,
    /// The body is larger or smaller than announced or expected.
    Size,
    /// The downloaded file's checksum is not the published one.
    Checksum,
    /// A file already in place is incomplete or has another checksum; it was left untouched.
    Conflict,
    /// The archive could not be unpacked, or lacks the expected files.
    Archive,
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Invalid`] for the flag or field `what`.
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            msg: msg.into(),
        }
    }
}

/// Adds context to candle results: `x.matmul(&w).ctx("head forward")?`.
pub trait CandleContext<T> {
    /// Wraps a candle error with a description of what was being computed.
    fn ctx(self, context: impl Into<String>) -> Result<T>;
}

impl<T> CandleContext<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: context.into(),
            source,
        })
    }
}
