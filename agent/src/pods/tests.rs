use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn spec() -> PodSpec {
    PodSpec {
        container_id: "abc123".into(),
        ifname: "eth0".into(),
        netns: "/var/run/netns/pod".into(),
        host_ifname: "lo".into(),
        host_ifindex: 1,
        quadrant: "dx".into(),
        addresses: vec!["10.250.0.5/24".parse().unwrap()],
        pod: Some("default/web-0".into()),
        cgroup: None,
    }
}

#[test]
fn attachment_keys_take_what_the_cni_spec_allows() {
    assert_eq!(key("abc_1.2-3", "eth0").unwrap(), "abc_1.2-3-eth0");
    for bad in ["", "a/b", "a b", "../x"] {
        assert!(
            key(bad, "eth0").unwrap_err().contains("container id"),
            "{bad}"
        );
    }
    for bad in ["", "..", "a/b", "a:b", "sixteen-bytes-xx", "a b"] {
        assert!(
            key("c", bad).unwrap_err().contains("interface name"),
            "{bad}"
        );
    }
}

#[test]
fn a_pod_is_checked_against_the_node() {
    let c = Config::embedded();
    assert_eq!(Pods::validate(&c, &spec()), Ok((Quadrant::Dx, None)));
    let unknown = PodSpec {
        quadrant: "zz".into(),
        ..spec()
    };
    assert!(
        Pods::validate(&c, &unknown)
            .unwrap_err()
            .contains("unknown quadrant \"zz\"")
    );
    let moved = PodSpec {
        host_ifindex: 999_999,
        ..spec()
    };
    assert!(
        Pods::validate(&c, &moved)
            .unwrap_err()
            .contains("has ifindex 1")
    );
    let gone = PodSpec {
        host_ifname: "no-such-veth".into(),
        ..spec()
    };
    assert!(
        Pods::validate(&c, &gone)
            .unwrap_err()
            .contains("no host interface")
    );
    // A pod may not take a quadrant's identity by its address.
    let squatter = PodSpec {
        addresses: vec!["10.240.2.9/24".parse().unwrap()],
        ..spec()
    };
    assert!(
        Pods::validate(&c, &squatter)
            .unwrap_err()
            .contains("quadrant px's prefix")
    );
    let none = PodSpec {
        addresses: vec![],
        ..spec()
    };
    assert!(
        Pods::validate(&c, &none)
            .unwrap_err()
            .contains("no IPv4 address")
    );
}

#[test]
fn a_queued_del_lies_beside_the_control_socket() {
    let dir = std::env::temp_dir().join(format!("quadrant-pods-{}", std::process::id()));
    let socket = dir.join("inst.sock");
    let a = Attachment {
        container_id: "abc".into(),
        ifname: "eth0".into(),
    };
    queue_del(&socket, &a).unwrap();
    let queued = dir.join("inst.cni-pending").join("abc-eth0");
    let back: Attachment = serde_json::from_str(&fs::read_to_string(&queued).unwrap()).unwrap();
    assert_eq!(back, a);
    assert_eq!(
        fs::metadata(&queued).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_pod_cgroup_is_a_path_or_a_systemd_slice_below_the_root() {
    let root = std::env::temp_dir().join(format!("quadrant-pod-cgroups-{}", std::process::id()));
    let slice = root
        .join("kubepods.slice")
        .join("kubepods-burstable.slice")
        .join("kubepods-burstable-pod1.slice");
    let path = root.join("kubepods").join("besteffort").join("pod2");
    for dir in [&slice, &path] {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("cgroup.procs"), "").unwrap();
    }
    assert_eq!(
        cgroup_dir(&root, "kubepods-burstable-pod1.slice").unwrap(),
        slice
    );
    assert_eq!(
        cgroup_dir(&root, "/kubepods/besteffort/pod2").unwrap(),
        path
    );
    assert_eq!(cgroup_dir(&root, "kubepods/besteffort/pod2").unwrap(), path);
    for (bad, needle) in [
        ("/kubepods/../../etc", "without '.' or '..'"),
        ("/", "below the cgroup2 root"),
        ("kubepods--pod1.slice", "empty parts"),
        ("/kubepods/guaranteed/pod3", "no cgroup at"),
    ] {
        let e = cgroup_dir(&root, bad).unwrap_err();
        assert!(e.contains(needle), "{bad}: {e}");
    }
    fs::remove_dir_all(&root).unwrap();
}
