//! What several fuzz checks share: a deterministic "RNG" for keys and
//! nonces built from the input. Included with `#[path = "common.rs"]` by each
//! check that needs it, so it is compiled into the fuzz targets and into the
//! crates' corpus replay tests alike.

/// Yields `seed`, `seed + 1`, … for every byte it fills: the same input
/// gives the same keys and nonces, run after run.
pub struct Fixed(pub u8);

impl rand_core::RngCore for Fixed {
    fn next_u32(&mut self) -> u32 {
        u32::from(self.0)
    }
    fn next_u64(&mut self) -> u64 {
        u64::from(self.0)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for (i, b) in dest.iter_mut().enumerate() {
            *b = self.0.wrapping_add(i as u8);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for Fixed {}
