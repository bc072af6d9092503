//! Inflating one compressed grain: the hot path of streamOptimized reads, so it decodes
//! straight into the caller's buffer and reuses one decompressor.

use flate2::{Decompress, FlushDecompress, Status};

/// Inflates the zlib stream `input` into `out`, which must be exactly large enough:
/// returns the bytes produced, or why the data is not one whole zlib stream that fits.
pub fn inflate(dec: &mut Decompress, input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    // zlib framing (RFC 1950): VMware and qemu both compress with zlib's compress2.
    dec.reset(true);
    let status = dec
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| format!("invalid deflate data: {e}"))?;
    let produced =
        usize::try_from(dec.total_out()).map_err(|_| "decompressed size overflows".to_owned())?;
    match status {
        Status::StreamEnd => Ok(produced),
        Status::Ok | Status::BufError if produced >= out.len() => {
            Err(format!("decompresses to more than {} bytes", out.len()))
        }
        Status::Ok | Status::BufError => Err(format!(
            "compressed data ends after {produced} bytes of output"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    pub(crate) fn zlib(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::fast(), true);
        let mut out = Vec::with_capacity(data.len() * 2 + 64);
        c.compress_vec(data, &mut out, FlushCompress::Finish)
            .unwrap();
        out
    }

    #[test]
    fn inflates_exactly_and_rejects_the_rest() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let z = zlib(&data);
        let mut dec = Decompress::new(true);
        let mut out = vec![0u8; 4096];
        assert_eq!(inflate(&mut dec, &z, &mut out).unwrap(), 4096);
        assert_eq!(out, data);
        // Reused decompressor, short output buffer.
        let mut small = vec![0u8; 100];
        assert!(
            inflate(&mut dec, &z, &mut small)
                .unwrap_err()
                .contains("more than")
        );
        // Truncated input.
        assert!(inflate(&mut dec, &z[..z.len() / 2], &mut out).is_err());
        // Garbage.
        let mut bad = z.clone();
        bad[5] ^= 0xff;
        bad[6] ^= 0x55;
        assert!(inflate(&mut dec, &bad, &mut out).is_err() || out != data);
        assert!(inflate(&mut dec, b"\x00\x01\x02", &mut out).is_err());
    }
}
