//! Where a command writes its results: it refuses to replace an existing output or one of
//! its own inputs unless told to, holds a lock file so that two runs never write the
//! same output at once, fingerprints the inputs a resumable run must continue with, and
//! gives written files the mode the umask asks for.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The lock file a command creates inside the output directory it writes.
pub const LOCK_FILE: &str = ".genarm.lock";

/// Refuses an output that exists and holds something (a non-empty file, or a directory
/// with entries other than a lock file) unless `allowed`; `how` says which flag allows it
/// (e.g. "pass --overwrite to replace it").
pub fn refuse_existing(out: &Path, allowed: bool, how: &str) -> Result<()> {
    if allowed || !holds_something(out)? {
        return Ok(());
    }
    let what = if out.is_dir() {
        "is a directory that is not empty"
    } else {
        "already exists"
    };
    Err(Error::Request(format!("{}: {what}; {how}", out.display())))
}

fn holds_something(path: &Path) -> Result<bool> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(path, e)),
    };
    if !meta.is_dir() {
        return Ok(meta.len() > 0);
    }
    let mut entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    Ok(entries.any(|e| e.map_or(true, |e| e.file_name() != LOCK_FILE)))
}

/// Refuses an output that is one of the command's inputs, or a directory holding one
/// (the paths compared after resolving links and `..`). `inputs` are (flag, path).
pub fn refuse_input_as_output(out: &Path, out_flag: &str, inputs: &[(&str, &Path)]) -> Result<()> {
    let out_abs = resolved(out);
    for (flag, input) in inputs {
        let input_abs = resolved(input);
        if input_abs == out_abs || input_abs.starts_with(&out_abs) && out.is_dir() {
            return Err(Error::Request(format!(
                "{out_flag} {} would overwrite the input {flag} {}; choose another output",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// `path` made absolute with links resolved as far as it exists (an output usually does
/// not exist yet: its nearest existing ancestor is resolved and the rest appended).
pub fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            resolved(parent).join(name)
        }
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// A lock held while a command writes an output; dropping it removes the lock file.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

impl OutputLock {
    /// Locks the output directory `dir` (created if needed) with `dir/.genarm.lock`.
    pub fn directory(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Self::at(dir.join(LOCK_FILE))
    }

    /// Locks the output file `file` with `file.lock` next to it (its folder is created
    /// if needed, as the writers do).
    pub fn file(file: &Path) -> Result<Self> {
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut name = file.as_os_str().to_owned();
        name.push(".lock");
        Self::at(PathBuf::from(name))
    }

    /// Creates `path` holding this process's id; fails, naming the holder, when it exists.
    pub fn at(path: PathBuf) -> Result<Self> {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                writeln!(f, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
                Ok(Self { path })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Error::Request(held_message(&path)))
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why a lock cannot be taken: a live writer, or a stale lock left by a killed one.
fn held_message(lock: &Path) -> String {
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let Ok(pid) = text.trim().parse::<u32>() else {
        return format!(
            "{}: a lock file without a process id; if no genarm writes this output, remove it",
            lock.display()
        );
    };
    match process_is_running(pid) {
        Some(false) => format!(
            "{}: stale lock left by process {pid}, which is no longer running; remove it \
             (rm {}) and run again",
            lock.display(),
            lock.display()
        ),
        _ => format!(
            "{}: another genarm (process {pid}) is writing this output; wait for it to \
             finish (if it is not running, remove the lock file)",
            lock.display()
        ),
    }
}

/// Whether `pid` is a live process; `None` where this cannot be told (no /proc).
fn process_is_running(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    proc.join("self")
        .exists()
        .then(|| proc.join(pid.to_string()).exists())
}

/// A file's resolved path and size, and for data files the FNV-1a hash of its bytes:
/// what a resumed run compares to know it continues on the same input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFingerprint {
    pub path: String,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fnv1a64: Option<String>,
}

impl FileFingerprint {
    /// Path and size of a file, or of every file in a directory (an HF model folder):
    /// cheap enough for multi-gigabyte weights.
    pub fn stat(path: &Path) -> Result<Self> {
        let mut bytes = 0;
        for file in files_of(path)? {
            bytes += std::fs::metadata(&file)
                .map_err(|e| Error::io(&file, e))?
                .len();
        }
        Ok(Self {
            path: resolved(path).display().to_string(),
            bytes,
            fnv1a64: None,
        })
    }

    /// Path, size and hash of a file (or a directory's files in name order).
    pub fn of(path: &Path) -> Result<Self> {
        let files = files_of(path)?;
        let mut hash = FNV_OFFSET;
        let mut bytes = 0u64;
        for file in &files {
            let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| Error::io(file, e))?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
                for &b in &buf[..n] {
                    hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
                }
            }
        }
        Ok(Self {
            path: resolved(path).display().to_string(),
            bytes,
            fnv1a64: Some(format!("{hash:016x}")),
        })
    }
}

/// `path` itself, or a directory's files in name order.
fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The first field (by name) whose values differ between two serialised records, as
/// "field: was X, now Y"; `None` when they agree.
pub fn first_difference<T: Serialize>(was: &T, now: &T) -> Option<String> {
    let (was, now) = (
        serde_json::to_value(was).ok()?,
        serde_json::to_value(now).ok()?,
    );
    match (&was, &now) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let (x, y) = (&a.get(k), &b.get(k));
                (x != y).then(|| format!("{k}: was {}, now {}", show(*x), show(*y)))
            })
        }
        _ => (was != now).then(|| format!("was {was}, now {now}")),
    }
}

fn show(v: Option<&serde_json::Value>) -> String {
    v.map_or("absent".into(), |v| v.to_string())
}

/// Gives `path` the mode a newly created file gets under the process's umask (0666 less
/// the umask). Writers that go through a private temporary file (mode 0600) call it
/// before renaming the file into place.
pub fn follow_umask(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = 0o666 & !umask();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The process's umask, read from /proc where there is one, else by creating a file and
/// reading its mode back.
#[cfg(unix)]
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let from_proc = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
        from_proc.unwrap_or_else(|| {
            use std::os::unix::fs::PermissionsExt;
            let probe = std::env::temp_dir().join(format!("genarm-umask-{}", std::process::id()));
            let mode = std::fs::File::create(&probe)
                .and_then(|f| f.metadata())
                .map_or(0o022, |m| !m.permissions().mode() & 0o666);
            let _ = std::fs::remove_file(&probe);
            mode
        })
    })
}

/// Saves tensors as safetensors through a temporary file renamed into place, with the
/// umask's mode (candle's writer creates a private 0600 temporary file).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    candle_core::safetensors::save(tensors, &tmp)?;
    follow_umask(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("genarm-outdir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_lock_is_refused_and_a_dropped_one_freed() {
        let dir = scratch("lock");
        let first = OutputLock::directory(&dir).unwrap();
        let err = OutputLock::directory(&dir).unwrap_err().to_string();
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        OutputLock::directory(&dir).unwrap();
    }

    #[test]
    fn an_empty_dir_or_a_lone_lock_is_not_existing_output() {
        let dir = scratch("existing");
        refuse_existing(&dir, false, "x").unwrap();
        let _lock = OutputLock::directory(&dir).unwrap();
        refuse_existing(&dir, false, "x").unwrap();
        std::fs::write(dir.join("a"), "1").unwrap();
        assert!(refuse_existing(&dir, false, "pass --overwrite").is_err());
        refuse_existing(&dir, true, "x").unwrap();
    }

    #[test]
    fn first_difference_names_the_field() {
        let a = serde_json::json!({"seed": 1, "lr": 0.1});
        let b = serde_json::json!({"seed": 2, "lr": 0.1});
        assert_eq!(first_difference(&a, &b).unwrap(), "seed: was 1, now 2");
        assert!(first_difference(&a, &a).is_none());
    }
}
