//! MXFP4 weights as the Hub publishes them (gpt-oss's experts: `*_blocks` U8 `[..., rows, in/32,
//! 16]` and `*_scales` U8 `[..., rows, in/32]`) repacked into ggml's `block_mxfp4` without
//! changing a value, so they load as stored (no dequantisation).
//!
//! Both are blocks of 32 E2M1 codes sharing one E8M0 exponent byte `e` (2^(e - 127)). They
//! differ in where the codes sit: the Hub packs element `2j` in the low nibble of byte `j` and
//! element `2j + 1` in its high nibble; ggml packs element `j` low and element `j + 16` high, and
//! puts `e` first (17 bytes a block). ggml's code table holds the E2M1 values doubled and its scale
//! is 2^(e - 128), so the same `e` byte means the same values.

/// Bytes per ggml `block_mxfp4` (one exponent byte, 16 bytes of codes).
pub const GGML_BLOCK_BYTES: usize = 17;

/// Repack `blocks` (16 bytes of codes per block) and `scales` (one E8M0 byte per block), in the
/// Hub's order, into ggml `block_mxfp4` bytes. `None` when the lengths do not describe the same
/// number of blocks.
pub fn hub_to_ggml(blocks: &[u8], scales: &[u8]) -> Option<Vec<u8>> {
    if blocks.len() != scales.len() * 16 {
        return None;
    }
    let mut out = Vec::with_capacity(scales.len() * GGML_BLOCK_BYTES);
    for (codes, &e) in blocks.chunks_exact(16).zip(scales) {
        let code = |i: usize| (codes[i / 2] >> (4 * (i % 2))) & 0x0F;
        out.push(e);
        out.extend((0..16).map(|j| code(j) | (code(j + 16) << 4)));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{convert_to_f32, DType};

    /// transformers' dequantisation of the Hub layout (`convert_moe_packed_tensors`): the E2M1
    /// table, low nibble first, times 2^(e - 127).
    fn hub_dequant(blocks: &[u8], scales: &[u8]) -> Vec<f32> {
        const LUT: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];
        let mut out = Vec::new();
        for (codes, &e) in blocks.chunks_exact(16).zip(scales) {
            let scale = 2f64.powi(e as i32 - 127);
            for &b in codes {
                out.push((LUT[(b & 0x0F) as usize] as f64 * scale) as f32);
                out.push((LUT[(b >> 4) as usize] as f64 * scale) as f32);
            }
        }
        out
    }

    #[test]
    fn repacked_blocks_hold_the_hub_values_exactly() {
        let n = 64;
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let blocks: Vec<u8> = (0..n * 16).map(|_| next() as u8).collect();
        // Exponents across the range, the extremes included (2^-127 and 2^127).
        let mut scales: Vec<u8> = (0..n).map(|_| 100 + (next() % 56) as u8).collect();
        scales[0] = 0;
        scales[1] = 254;
        scales[2] = 127;
        let ggml = hub_to_ggml(&blocks, &scales).unwrap();
        assert_eq!(ggml.len(), n * GGML_BLOCK_BYTES);
        assert_eq!(DType::MXFP4.row_size(32), GGML_BLOCK_BYTES);
        let got = convert_to_f32(DType::MXFP4, &ggml).unwrap();
        let want = hub_dequant(&blocks, &scales);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g == w, "element {i} (block {}): ggml {g} vs hub {w}", i / 32);
        }
        assert!(hub_to_ggml(&blocks[1..], &scales).is_none());
        assert!(hub_to_ggml(&blocks, &scales[1..]).is_none());
    }
}
