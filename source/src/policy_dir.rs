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
    // The entry's type comes with the directory listing; only symlinks (a ConfigMap mount's
    // files are) cost a stat to learn what they point at.
    let mut entries: Vec<(PathBuf, bool)> = fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .map(|e| {
            let e = e.map_err(|err| io(dir, err))?;
            let path = e.path();
            let ft = e.file_type().map_err(|err| io(&path, err))?;
            let is_dir = if ft.is_symlink() {
                path.is_dir()
            } else {
                ft.is_dir()
            };
            Ok((path, is_dir))
        })
        .collect::<Result<_, _>>()?;
    // One directory: file names order the entries (cheaper than comparing whole paths).
    entries.sort_by(|(a, _), (b, _)| a.file_name().cmp(&b.file_name()));
    for (path, is_dir) in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if is_dir {
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

/// A file's size and modification time: it changes whenever the file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    mtime_ns: u128,
}

fn stamp(f: &Path) -> Result<Stamp, ReadError> {
    let meta = fs::metadata(f).map_err(|e| io(f, e))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(Stamp {
        len: meta.len(),
        mtime_ns,
    })
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
    Ok(fingerprint_of(&scan(paths)?))
}

/// The policy files under `paths`, each with its stamp (size and modification time).
pub type Scan = Vec<(PathBuf, Stamp)>;

/// Lists the policy files under `paths` and stamps each: one stat per file. A caller that
/// fingerprints and then loads passes the same scan to both.
pub fn scan(paths: &[PathBuf]) -> Result<Scan, ReadError> {
    policy_files(paths)?
        .into_iter()
        .map(|f| {
            let s = stamp(&f)?;
            Ok((f, s))
        })
        .collect()
}

/// The [`fingerprint`] of a scan.
fn fingerprint_of(scan: &Scan) -> String {
    let mut out = String::new();
    for (f, stamp) in scan {
        out.push_str(&format!(
            "{}:{}:{}\n",
            f.display(),
            stamp.len,
            stamp.mtime_ns
        ));
    }
    out
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
    files: std::collections::BTreeMap<PathBuf, (Stamp, ParsedResult)>,
}

type ParsedResult = Result<membrane_policy::parse::ParsedFile, Vec<Diagnostic>>;

impl PolicyCache {
    /// Reads the policy under `paths`, reusing unchanged files' parses.
    pub fn load(
        &mut self,
        paths: &[PathBuf],
    ) -> Result<Result<PolicySet, Vec<Diagnostic>>, ReadError> {
        self.load_scanned(scan(paths)?)
    }

    /// Reads the policy files of a [`scan`], reusing the parses of files whose stamp is the
    /// one seen last time.
    pub fn load_scanned(
        &mut self,
        scan: Scan,
    ) -> Result<Result<PolicySet, Vec<Diagnostic>>, ReadError> {
        let mut next = std::collections::BTreeMap::new();
        for (f, stamp) in scan {
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

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: NAME}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{}]\n";

    fn write(path: &Path, name: &str) {
        fs::write(path, POLICY.replace("NAME", name)).unwrap();
    }

    #[test]
    fn scan_walks_like_a_configmap_mount_and_the_cache_reparses_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // A ConfigMap mount: hidden timestamped dir, `..data` link, files linked through it.
        fs::create_dir_all(root.join("..2026/sub")).unwrap();
        write(&root.join("..2026/a.yaml"), "a");
        write(&root.join("..2026/sub/b.yml"), "b");
        std::os::unix::fs::symlink("..2026", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/a.yaml", root.join("a.yaml")).unwrap();
        std::os::unix::fs::symlink("..data/sub", root.join("sub")).unwrap();
        fs::write(root.join("notes.txt"), "not policy").unwrap();
        write(&root.join("c.yaml"), "c");

        let paths = vec![root.to_path_buf()];
        let scan = scan(&paths).unwrap();
        let names: Vec<String> = scan
            .iter()
            .map(|(p, _)| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.yaml", "c.yaml", "sub/b.yml"]);
        assert_eq!(fingerprint_of(&scan), fingerprint(&paths).unwrap());

        let mut cache = PolicyCache::default();
        let first = cache.load_scanned(scan).unwrap().unwrap();
        assert_eq!(first.rules.len(), 3);
        let before = fingerprint(&paths).unwrap();
        write(&root.join("c.yaml"), "c-renamed");
        assert_ne!(fingerprint(&paths).unwrap(), before);
        let second = cache.load(&paths).unwrap().unwrap();
        // Unchanged files keep their parsed rules (same Arc); the written one is new.
        let same = |i: usize| std::sync::Arc::ptr_eq(&first.rules[i], &second.rules[i]);
        assert_eq!(
            (0..3).map(same).collect::<Vec<_>>(),
            [true, false, true],
            "{:?}",
            second
                .rules
                .iter()
                .map(|r| r.origin.to_string())
                .collect::<Vec<_>>()
        );
    }
}
