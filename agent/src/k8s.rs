//! Kubernetes labels of a server, from /proc alone (no API access): the pod's cgroup path says
//! it runs in a pod and which container, the pod's own filesystem gives its hostname (the pod
//! name) and its service-account namespace.
use std::path::Path;

use crate::labels::{label, Labels};

/// The container ID in a kubepods cgroup path, short form (12 hex digits as crictl shows).
/// `/kubepods.slice/…-pod<uid>.slice/cri-containerd-<id>.scope` (systemd driver) or
/// `/kubepods/burstable/pod<uid>/<id>` (cgroupfs driver).
pub fn container_id(cgroup: &str) -> Option<String> {
    let line = cgroup.lines().find(|l| l.contains("kubepods"))?;
    let last = line.rsplit('/').next()?;
    let id = last.strip_suffix(".scope").unwrap_or(last);
    let id = id.rsplit('-').next()?;
    (id.len() >= 12 && id.bytes().all(|c| c.is_ascii_hexdigit())).then(|| id[..12].to_string())
}

/// `namespace`, `pod`, `container` of process `pid` when it runs in a Kubernetes pod; empty
/// otherwise. `proc` is /proc (a parameter for tests).
pub fn labels(proc: &Path, pid: u32) -> Labels {
    let dir = proc.join(pid.to_string());
    let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else { return Vec::new() };
    let Some(container) = container_id(&cgroup) else { return Vec::new() };
    let read = |rel: &str| {
        std::fs::read_to_string(dir.join("root").join(rel)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    };
    let mut out = Vec::new();
    // Only when the pod mounts its service-account token (the default).
    if let Some(ns) = read("var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .or_else(|| read("run/secrets/kubernetes.io/serviceaccount/namespace"))
    {
        out.push(label("namespace", ns));
    }
    if let Some(pod) = read("etc/hostname") {
        out.push(label("pod", pod));
    }
    out.push(label("container", container));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";

    #[test]
    fn container_ids_from_both_cgroup_drivers() {
        let systemd = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7c1f_2a.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(container_id(&systemd).as_deref(), Some("4f1e2d3c4b5a"));
        let cgroupfs = format!("12:memory:/kubepods/burstable/pod7c1f-2a/{ID}\n0::/\n");
        assert_eq!(container_id(&cgroupfs).as_deref(), Some("4f1e2d3c4b5a"));
        assert_eq!(container_id("0::/user.slice/user-0.slice/session-3.scope\n"), None);
        assert_eq!(container_id("0::/system.slice/docker-abc.scope\n"), None);
    }

    #[test]
    fn labels_from_a_pods_proc_entry() {
        let proc = std::env::temp_dir().join(format!("wsgiscope-k8s-{}", std::process::id()));
        let dir = proc.join("4242");
        std::fs::create_dir_all(dir.join("root/etc")).unwrap();
        std::fs::create_dir_all(dir.join("root/var/run/secrets/kubernetes.io/serviceaccount")).unwrap();
        std::fs::write(dir.join("cgroup"), format!("0::/kubepods/besteffort/pod1/{ID}\n")).unwrap();
        std::fs::write(dir.join("root/etc/hostname"), "shop-7d9f8-abcde\n").unwrap();
        std::fs::write(dir.join("root/var/run/secrets/kubernetes.io/serviceaccount/namespace"), "prod").unwrap();
        let l = labels(&proc, 4242);
        assert_eq!(
            l,
            vec![label("namespace", "prod".to_string()), label("pod", "shop-7d9f8-abcde".to_string()), label("container", "4f1e2d3c4b5a".to_string())]
        );
        // Not in a pod: no labels.
        std::fs::write(dir.join("cgroup"), "0::/user.slice\n").unwrap();
        assert!(labels(&proc, 4242).is_empty());
        std::fs::remove_dir_all(&proc).unwrap();
    }
}
