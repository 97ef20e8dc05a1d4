//! Links the library with `-z nodelete`: NVML clients may `dlclose` and reopen it, and the fake's
//! record of which XIDs were delivered must last for the whole process, as the driver's does.

fn main() {
    println!("cargo::rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
