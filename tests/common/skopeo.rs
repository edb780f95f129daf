//! Real `skopeo` (Debian's package) copying images over the distribution
//! API into OCI layouts, and the layouts read back as files, so a copy
//! through the mirror can be compared byte for byte with one taken
//! straight from the registry.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// `skopeo copy --preserve-digests` of `docker://SOURCE` (plain http, no
/// TLS verification, no signature policy) into `oci:DIR:TAG`, with `extra`
/// arguments (`--override-arch arm64`); its stderr on failure.
pub fn copy_to_layout(source: &str, dir: &Path, tag: &str, extra: &[&str]) -> Result<(), String> {
    let skopeo = super::require_binary("skopeo", &["/usr/bin/skopeo"], "apt-get install skopeo");
    let output = Command::new(skopeo)
        .args([
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .args(extra)
        .arg(format!("docker://{source}"))
        .arg(format!("oci:{}:{tag}", dir.display()))
        .output()
        .map_err(|e| format!("run skopeo: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Every file of an OCI layout, by path relative to `dir`.
pub fn layout_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read the layout") {
            let path = entry.expect("a layout entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let name = path.strip_prefix(root).expect("inside the layout");
                out.insert(
                    name.to_string_lossy().into_owned(),
                    std::fs::read(&path).expect("read a layout file"),
                );
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}
