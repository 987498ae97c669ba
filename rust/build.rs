// Let `cargo test` find libpython at run time (pyenv installs it outside the
// loader path). The wheel build sets PYO3_BUILD_EXTENSION_MODULE and needs no rpath.
fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_BUILD_EXTENSION_MODULE");
    if std::env::var_os("PYO3_BUILD_EXTENSION_MODULE").is_none() {
        pyo3_build_config::add_libpython_rpath_link_args();
    }
}
