//! The one way the harness starts gunicorn (the tests' servers, the demo's and the bench's):
//! the executable of a venv under the repository, no control socket, a loopback bind, the app
//! directory, the options of the caller, the app module, and the counting middleware's truth log
//! set or cleared.
use std::{
    fmt::Display,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

/// Where the test app's counting middleware logs one JSON line per request, when set.
pub const TRUTH_LOG_ENV: &str = "WSGISCOPE_TRUTH_LOG";

/// A gunicorn command line.
#[derive(Clone, Debug)]
pub struct Gunicorn {
    venv: String,
    bind: String,
    chdir: PathBuf,
    app: String,
    args: Vec<String>,
    truth_log: Option<PathBuf>,
}

impl Gunicorn {
    /// gunicorn from `.venv`, serving `app` (`module:callable`) found in `chdir`, bound to `bind`.
    pub fn new(bind: impl Display, chdir: impl Into<PathBuf>, app: &str) -> Self {
        Gunicorn {
            venv: ".venv".into(),
            bind: bind.to_string(),
            chdir: chdir.into(),
            app: app.into(),
            args: Vec::new(),
            truth_log: None,
        }
    }

    /// The venv under the repository (`.venv-debian`: Debian's python3.11).
    pub fn venv(mut self, venv: &str) -> Self {
        self.venv = venv.into();
        self
    }

    /// Options (workers, worker class, logs…), placed before the app module.
    pub fn args(mut self, args: &[impl AsRef<str>]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// The counting middleware logs to `path` (without it, the variable is cleared).
    pub fn truth_log(mut self, path: &Path) -> Self {
        self.truth_log = Some(path.to_path_buf());
        self
    }

    /// The executable, under the repository at `root`.
    pub fn program(&self, root: &Path) -> PathBuf {
        root.join(&self.venv).join("bin/gunicorn")
    }

    /// The arguments after the executable.
    pub fn argv(&self) -> Vec<String> {
        let mut argv: Vec<String> = ["--no-control-socket", "-b", &self.bind, "--chdir"]
            .map(String::from)
            .to_vec();
        argv.push(self.chdir.display().to_string());
        argv.extend(self.args.iter().cloned());
        argv.push(self.app.clone());
        argv
    }

    /// The command line as a person types it in the repository (the venv relative to it).
    pub fn shell_line(&self) -> String {
        format!("{}/bin/gunicorn {}", self.venv, self.argv().join(" "))
    }

    /// The command to spawn; fails if the venv has no gunicorn.
    pub fn command(&self, root: &Path) -> Result<Command> {
        let program = self.program(root);
        if !program.exists() {
            bail!("{} missing: run `cargo xtask setup`", program.display());
        }
        let mut cmd = Command::new(program);
        cmd.args(self.argv());
        match &self.truth_log {
            Some(path) => cmd.env(TRUTH_LOG_ENV, path),
            None => cmd.env_remove(TRUTH_LOG_ENV),
        };
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_command_line() {
        let g = Gunicorn::new("127.0.0.1:PORT", "tests/apps", "benchapp:app").args(&["-w", "2"]);
        assert_eq!(
            g.shell_line(),
            ".venv/bin/gunicorn --no-control-socket -b 127.0.0.1:PORT --chdir tests/apps -w 2 benchapp:app"
        );
        let g = g.venv(".venv-debian");
        assert_eq!(
            g.program(Path::new("/r")),
            Path::new("/r/.venv-debian/bin/gunicorn")
        );
        let err = g.command(Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("cargo xtask setup"), "{err}");
    }
}
