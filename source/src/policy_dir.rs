//! Reads policy from files and directories (the default policy source).

use std::fs;
use std::path::{Path, PathBuf};

use membrane_policy::{Diagnostic, PolicySet};

/// Why a policy source could not be read (as opposed to being invalid).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A path could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The YAML files under `paths`: files as given, directories walked recursively (hidden entries
/// skipped), `.yaml`/`.yml` only, in a stable order.
pub fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ReadError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = fs::metadata(p).map_err(|e| io(p, e))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ReadError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| io(dir, err)))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn io(path: &Path, source: std::io::Error) -> ReadError {
    ReadError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A file's size and modification time, `LEN:MTIME_NS`: it changes whenever the file is written.
fn stamp(f: &Path) -> Result<String, ReadError> {
    let meta = fs::metadata(f).map_err(|e| io(f, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{}:{mtime}", meta.len()))
}

/// A file's text, or the diagnostic saying it is not UTF-8.
fn read_text(f: &Path) -> Result<Result<String, Diagnostic>, ReadError> {
    let bytes = fs::read(f).map_err(|e| io(f, e))?;
    Ok(String::from_utf8(bytes).map_err(|_| Diagnostic {
        file: f.display().to_string(),
        line: 0,
        column: 0,
        field: String::new(),
        message: "not valid UTF-8".into(),
    }))
}

/// A fingerprint of the policy files (names, sizes, modification times): it changes whenever a
/// file is added, removed or written.
pub fn fingerprint(paths: &[PathBuf]) -> Result<String, ReadError> {
    let mut out = String::new();
    for f in policy_files(paths)? {
        out.push_str(&format!("{}:{}\n", f.display(), stamp(&f)?));
    }
    Ok(out)
}

/// Reads and validates every policy file under `paths`. The outer error is an I/O failure; the
/// inner one is the list of problems in the files.
pub fn load(paths: &[PathBuf]) -> Result<Result<PolicySet, Vec<Diagnostic>>, ReadError> {
    let files = policy_files(paths)?;
    let mut texts = Vec::with_capacity(files.len());
    for f in &files {
        match read_text(f)? {
            Ok(text) => texts.push((f.display().to_string(), text)),
            Err(d) => return Ok(Err(vec![d])),
        }
    }
    Ok(PolicySet::from_sources(
        texts.iter().map(|(n, t)| (n.as_str(), t.as_str())),
    ))
}

/// Policy read from a directory, re-parsing only the files whose size or modification time
/// changed since the last load: a change to one policy among thousands costs one file's parse,
/// and the unchanged files' rules stay the same `Arc`s (the resolver skips them).
#[derive(Debug, Default)]
pub struct PolicyCache {
    files: std::collections::BTreeMap<PathBuf, (String, ParsedResult)>,
}

type ParsedResult = Result<membrane_policy::parse::ParsedFile, Vec<Diagnostic>>;

impl PolicyCache {
    /// Reads the policy under `paths`, reusing unchanged files' parses.
    pub fn load(
        &mut self,
        paths: &[PathBuf],
    ) -> Result<Result<PolicySet, Vec<Diagnostic>>, ReadError> {
        let mut next = std::collections::BTreeMap::new();
        for f in policy_files(paths)? {
            let stamp = stamp(&f)?;
            let parsed = match self.files.remove(&f) {
                Some((s, parsed)) if s == stamp => parsed,
                _ => match read_text(&f)? {
                    Ok(text) => membrane_policy::parse_file(&f.display().to_string(), &text),
                    Err(d) => Err(vec![d]),
                },
            };
            next.insert(f, (stamp, parsed));
        }
        self.files = next;
        let names: Vec<(String, &ParsedResult)> = self
            .files
            .iter()
            .map(|(f, (_, p))| (f.display().to_string(), p))
            .collect();
        Ok(PolicySet::from_parsed(
            names.iter().map(|(n, p)| (n.as_str(), *p)),
        ))
    }
}

/// Reads and validates an endpoints file (workloads with labels and addresses or prefixes).
pub fn load_endpoints(
    path: &Path,
) -> Result<Result<Vec<membrane_policy::endpoints::EndpointSpec>, Vec<Diagnostic>>, ReadError> {
    Ok(match read_text(path)? {
        Ok(text) => membrane_policy::endpoints::parse_endpoints(&path.display().to_string(), &text),
        Err(d) => Err(vec![d]),
    })
}
