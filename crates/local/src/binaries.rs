//! Finding the server binaries (`initdb`, `postgres`, `nats-server`) on this machine.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Debian's package of the PostgreSQL server.
const POSTGRES_PACKAGE: &str = "postgresql";
/// Debian's package of nats-server.
const NATS_PACKAGE: &str = "nats-server";

/// Debian's command that installs `packages`.
fn install_command(packages: &[&str]) -> String {
    format!("apt-get install {}", packages.join(" "))
}

/// One place to look for a binary.
#[derive(Debug, Clone)]
pub(crate) enum SearchDir {
    /// A fixed directory.
    Dir(PathBuf),
    /// Every directory of this `PATH` value (`None`: `PATH` is unset).
    PathVar(Option<OsString>),
}

/// The PostgreSQL programs a server needs.
#[derive(Debug, Clone)]
pub(crate) struct PgBinaries {
    /// `initdb`, to create a cluster.
    pub(crate) initdb: PathBuf,
    /// `postgres`, the server itself.
    pub(crate) postgres: PathBuf,
}

impl PgBinaries {
    /// Looks in `pg_config --bindir`, then `/usr/lib/postgresql/<highest>/bin`, then `PATH`.
    pub(crate) fn locate() -> Result<Self> {
        let search = pg_search_dirs();
        Ok(Self {
            initdb: locate("initdb", &search, POSTGRES_PACKAGE)?,
            postgres: locate("postgres", &search, POSTGRES_PACKAGE)?,
        })
    }
}

/// Looks on `PATH`, then in `/usr/sbin` and `/usr/local/bin`.
pub(crate) fn nats_server() -> Result<PathBuf> {
    locate("nats-server", &nats_search_dirs(), NATS_PACKAGE)
}

fn nats_search_dirs() -> Vec<SearchDir> {
    vec![
        SearchDir::PathVar(std::env::var_os("PATH")),
        SearchDir::Dir("/usr/sbin".into()),
        SearchDir::Dir("/usr/local/bin".into()),
    ]
}

/// Checks that every binary the servers need (`initdb`, `postgres`, `nats-server`) is installed,
/// and names all that are not in one error, with the one command that installs them.
pub fn require_server_binaries() -> Result<()> {
    let pg = pg_search_dirs();
    let nats = nats_search_dirs();
    require_all(&[
        ("initdb", &pg, POSTGRES_PACKAGE),
        ("postgres", &pg, POSTGRES_PACKAGE),
        ("nats-server", &nats, NATS_PACKAGE),
    ])
}

/// [`Error::MissingBinaries`] naming each `(binary, search, package)` not found, or `Ok`.
fn require_all(wanted: &[(&str, &[SearchDir], &str)]) -> Result<()> {
    let mut missing = Vec::new();
    let mut packages: Vec<&str> = Vec::new();
    for &(binary, search, package) in wanted {
        if locate(binary, search, package).is_err() {
            missing.push(format!("{binary} (looked in {})", describe(search)));
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingBinaries { missing, install: install_command(&packages) })
    }
}

fn pg_search_dirs() -> Vec<SearchDir> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let pg_config =
        Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).stderr(Stdio::null()).output();
    if let Ok(out) = pg_config
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !dir.is_empty() {
            dirs.push(dir.into());
        }
    }
    // Debian's layout: /usr/lib/postgresql/<major>/bin, highest major first.
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    for (_, dir) in versioned {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let mut search: Vec<SearchDir> = dirs.into_iter().map(SearchDir::Dir).collect();
    search.push(SearchDir::PathVar(std::env::var_os("PATH")));
    search
}

/// Returns the first executable file named `binary` in `search`, or
/// [`Error::MissingBinary`] naming where we looked and the command that installs `package`.
pub(crate) fn locate(binary: &str, search: &[SearchDir], package: &str) -> Result<PathBuf> {
    for place in search {
        let found = match place {
            SearchDir::Dir(dir) => executable(&dir.join(binary)),
            SearchDir::PathVar(path) => path
                .iter()
                .flat_map(std::env::split_paths)
                .filter(|dir| !dir.as_os_str().is_empty())
                .find_map(|dir| executable(&dir.join(binary))),
        };
        if let Some(found) = found {
            return Ok(found);
        }
    }
    Err(Error::MissingBinary {
        binary: binary.to_owned(),
        searched: describe(search),
        install: install_command(&[package]),
    })
}

fn executable(candidate: &Path) -> Option<PathBuf> {
    let meta = std::fs::metadata(candidate).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then(|| candidate.to_path_buf())
}

/// "a", "a and b", "a, b and c"; "no directories" for an empty search.
fn describe(search: &[SearchDir]) -> String {
    let names: Vec<String> = search
        .iter()
        .map(|place| match place {
            SearchDir::Dir(dir) => dir.display().to_string(),
            SearchDir::PathVar(_) => "PATH".to_owned(),
        })
        .collect();
    match names.as_slice() {
        [] => "no directories".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_error_names_the_install_command() {
        let err = locate("nats-server", &[], NATS_PACKAGE).unwrap_err();
        assert!(matches!(err, Error::MissingBinary { .. }));
        let msg = err.to_string();
        assert!(msg.contains("apt-get install nats-server"), "unexpected message: {msg}");
        assert!(msg.starts_with("nats-server not found"), "{msg}");
    }

    #[test]
    fn a_missing_postgres_binary_names_every_place_searched() {
        let search = [
            SearchDir::Dir("/nonexistent/postgresql/15/bin".into()),
            SearchDir::PathVar(Some("/nonexistent/a:/nonexistent/b".into())),
        ];
        let msg = locate("initdb", &search, POSTGRES_PACKAGE).unwrap_err().to_string();
        assert_eq!(
            msg,
            "initdb not found (looked in /nonexistent/postgresql/15/bin and PATH); \
             install it with: apt-get install postgresql"
        );
    }

    #[test]
    fn a_binary_on_the_search_path_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("nats-server");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let search = [SearchDir::PathVar(None), SearchDir::PathVar(Some(dir.path().as_os_str().to_owned()))];
        assert_eq!(locate("nats-server", &search, NATS_PACKAGE).unwrap(), bin);
    }

    #[test]
    fn every_missing_binary_is_named_at_once_with_one_install_command() {
        let nowhere = [SearchDir::Dir("/nonexistent/bin".into())];
        let msg = require_all(&[
            ("initdb", &nowhere, POSTGRES_PACKAGE),
            ("postgres", &nowhere, POSTGRES_PACKAGE),
            ("nats-server", &nowhere, NATS_PACKAGE),
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            msg,
            "server binaries not found:\n  \
             initdb (looked in /nonexistent/bin)\n  \
             postgres (looked in /nonexistent/bin)\n  \
             nats-server (looked in /nonexistent/bin)\n\
             install them with: apt-get install postgresql nats-server"
        );
    }

    #[test]
    fn binaries_that_are_installed_are_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("nats-server");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let here = [SearchDir::Dir(dir.path().to_owned())];
        let nowhere = [SearchDir::Dir("/nonexistent/bin".into())];
        assert!(require_all(&[("nats-server", &here, NATS_PACKAGE)]).is_ok());
        let msg =
            require_all(&[("initdb", &nowhere, POSTGRES_PACKAGE), ("nats-server", &here, NATS_PACKAGE)])
                .unwrap_err()
                .to_string();
        assert!(msg.contains("initdb") && !msg.contains("nats-server"), "{msg}");
        assert!(msg.ends_with("apt-get install postgresql"), "{msg}");
    }
}
