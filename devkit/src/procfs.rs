//! What the harness reads about processes from /proc.
use std::fs;

/// Every process now running.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// The fields of /proc/PID/stat from field 3 (state) on: the command name before them may hold
/// spaces and parentheses, so they are counted after its last ')'. None once the process is gone.
pub fn stat(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(String::from).collect())
}

/// The parent of `pid` (field 4 of its stat).
pub fn ppid(pid: u32) -> Option<u32> {
    stat(pid)?.get(1)?.parse().ok()
}

/// The processes whose parent is `parent` (a server's workers), in PID order.
pub fn children(parent: u32) -> Vec<u32> {
    let mut out: Vec<u32> = pids()
        .into_iter()
        .filter(|&pid| ppid(pid) == Some(parent))
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        assert!(children(me).contains(&child.id()));
        assert_eq!(ppid(child.id()), Some(me));
        assert_eq!(stat(child.id()).unwrap()[1], me.to_string());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!children(me).contains(&child.id()));
    }
}
