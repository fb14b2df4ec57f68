//! Codec throughput measured against a plain read pass (being written).

/// A deterministic pseudo-gradient: roughly Gaussian values with unit spread.
pub(crate) fn synthetic_update(seed: u64, params: usize) -> Vec<f32> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // splitmix64: cheap, and the same sequence on every machine.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..params)
        .map(|_| {
            let bits = next();
            // Sum of four 16-bit uniforms: bell-shaped, mean 0, variance 1.
            let sum: u64 = (0..4).map(|i| (bits >> (16 * i)) & 0xFFFF).sum();
            ((sum as f32 / 65536.0) - 2.0) * 1.732
        })
        .collect()
}
