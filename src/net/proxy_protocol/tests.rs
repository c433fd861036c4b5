use super::*;
use proptest::prelude::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn complete(buf: &[u8]) -> (Header, usize) {
    match parse(buf) {
        Ok(Parsed::Complete { header, len }) => (header, len),
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

fn malformed(buf: &[u8]) -> String {
    match parse(buf) {
        Err(e @ ParseError::Malformed { .. }) => e.to_string(),
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

#[test]
fn v1_tcp4_and_tcp6_and_unknown() {
    let (h, len) = complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /");
    assert_eq!(len, 45);
    assert_eq!(h.version, Version::V1);
    assert_eq!(
        h.addresses,
        Some((addr("192.0.2.1:56324"), addr("198.51.100.2:443")))
    );
    let (h, _) = complete(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
    assert_eq!(
        h.addresses,
        Some((addr("[2001:db8::1]:1"), addr("[::1]:65535")))
    );
    let (h, len) = complete(b"PROXY UNKNOWN\r\n");
    assert_eq!((h.addresses, len), (None, 15));
    let (h, _) = complete(b"PROXY UNKNOWN ffff:f::1 ::1 1 2\r\n");
    assert_eq!(h.addresses, None);
}

#[test]
fn v1_errors_name_the_problem() {
    assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n").contains("carriage return"));
    assert!(malformed(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n").contains("TCP5"));
    assert!(malformed(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n").contains("source address"));
    assert!(malformed(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n").contains("source address"));
    assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n").contains("source port"));
    assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n").contains("destination port"));
    assert!(malformed(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n").contains("fields"));
    assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n").contains("fields"));
    assert!(malformed(b"PROXY TCP4 1.2.3.4\x00").contains("0x00"));
    // Garbage fails before the CRLF could come.
    assert!(malformed(b"PROXY tcp4").contains("0x74"));
    assert!(matches!(
        parse(b"GET / HTTP/1.1\r\n"),
        Err(ParseError::NotProxy(_))
    ));
    assert!(matches!(
        parse(b"\x16\x03\x01"),
        Err(ParseError::NotProxy(_))
    ));
    assert!(matches!(parse(b"PROXX"), Err(ParseError::NotProxy(_))));
}

#[test]
fn v1_longest_header_is_accepted_and_one_more_byte_is_oversized() {
    let max = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(max.len(), 104);
    assert_eq!(complete(max).1, 104);
    // "PROXY UNKNOWN" may carry anything; 107 bytes with the CRLF is the limit.
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(V1_MAX_LEN - 2, b'A');
    long.extend_from_slice(b"\r\n");
    assert_eq!(complete(&long).1, V1_MAX_LEN);
    let mut too_long = b"PROXY UNKNOWN ".to_vec();
    too_long.resize(V1_MAX_LEN, b'A');
    assert!(matches!(parse(&too_long), Err(ParseError::Oversized(_))));
    too_long.extend_from_slice(b"\r\n");
    assert!(matches!(parse(&too_long), Err(ParseError::Oversized(_))));
}

#[test]
fn v2_addresses_local_and_tlvs() {
    let h = encode_v2(Some((addr("10.0.0.1:1234"), addr("10.0.0.2:80"))));
    assert_eq!(h.len(), 28);
    let mut buf = h.clone();
    buf.extend_from_slice(b"after");
    let (hdr, len) = complete(&buf);
    assert_eq!(len, 28);
    assert_eq!(
        hdr.addresses,
        Some((addr("10.0.0.1:1234"), addr("10.0.0.2:80")))
    );

    let h = encode_v2(Some((addr("[2001:db8::5]:9"), addr("[::1]:8080"))));
    assert_eq!(h.len(), 52);
    assert_eq!(
        complete(&h).0.addresses,
        Some((addr("[2001:db8::5]:9"), addr("[::1]:8080")))
    );

    // LOCAL: whatever block follows is ignored, the real endpoints apply.
    let local = encode_v2(None);
    assert_eq!(local.len(), 16);
    assert_eq!(
        complete(&local),
        (
            Header {
                version: Version::V2,
                addresses: None,
                tlvs: 0
            },
            16
        )
    );

    // An AWS NLB header: IPv4 addresses and a PP2_TYPE_AWS (0xEA) TLV with a
    // VPC endpoint id, plus a NOOP TLV of length 0.
    let mut aws = V2_SIGNATURE.to_vec();
    let vpce = b"\x01vpce-08d2bf15fac5001c9";
    let block_len = 12 + 3 + vpce.len() + 3;
    aws.extend_from_slice(&[0x21, 0x11]);
    aws.extend_from_slice(&(block_len as u16).to_be_bytes());
    aws.extend_from_slice(&[172, 31, 7, 113, 172, 31, 10, 31, 0xc8, 0xf2, 0x00, 0x50]);
    aws.push(0xea);
    aws.extend_from_slice(&(vpce.len() as u16).to_be_bytes());
    aws.extend_from_slice(vpce);
    aws.extend_from_slice(&[0x04, 0, 0]);
    let (hdr, len) = complete(&aws);
    assert_eq!(len, aws.len());
    assert_eq!(hdr.tlvs, 2);
    assert_eq!(
        hdr.addresses,
        Some((addr("172.31.7.113:51442"), addr("172.31.10.31:80")))
    );
}

#[test]
fn v2_errors() {
    let good = encode_v2(Some((addr("10.0.0.1:1234"), addr("10.0.0.2:80"))));
    let with = |i: usize, b: u8| {
        let mut v = good.clone();
        v[i] = b;
        v
    };
    assert!(malformed(&with(12, 0x11)).contains("version 1"));
    assert!(malformed(&with(12, 0x22)).contains("command"));
    assert!(malformed(&with(13, 0x41)).contains("family"));
    assert!(malformed(&with(13, 0x13)).contains("family"));
    // IPv6 family with only 12 bytes of addresses.
    assert!(malformed(&with(13, 0x21)).contains("IPv6 needs 36"));
    // A TLV that runs past the block.
    let mut tlv = good.clone();
    tlv[15] = 12 + 4;
    tlv.extend_from_slice(&[0xea, 0, 5, 1]);
    assert!(malformed(&tlv).contains("announces 5 bytes"));
    let mut stray = good.clone();
    stray[15] = 12 + 2;
    stray.extend_from_slice(&[0xea, 0]);
    assert!(malformed(&stray).contains("stray"));
    // Announced length over the cap: refused as soon as the length is known.
    let mut big = good[..16].to_vec();
    big[14..16].copy_from_slice(&((V2_MAX_PAYLOAD + 1) as u16).to_be_bytes());
    assert!(matches!(parse(&big), Err(ParseError::Oversized(_))));
}

#[test]
fn v2_largest_accepted_header() {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&(V2_MAX_PAYLOAD as u16).to_be_bytes());
    h.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1, 0, 1, 0, 2]);
    let value = V2_MAX_PAYLOAD - 12 - 3;
    h.push(0xe0);
    h.extend_from_slice(&(value as u16).to_be_bytes());
    h.resize(MAX_LEN, 0x55);
    assert_eq!(
        complete(&h),
        (
            Header {
                version: Version::V2,
                addresses: Some((addr("127.0.0.1:1"), addr("127.0.0.1:2"))),
                tlvs: 1
            },
            MAX_LEN
        )
    );
    assert_eq!(
        parse(&h[..MAX_LEN - 1]),
        Ok(Parsed::Incomplete {
            total: Some(MAX_LEN)
        })
    );
}

#[test]
fn mixed_families_are_sent_as_one() {
    // An IPv4 client reached through an IPv6 listener, and the reverse.
    let v = encode_v1(Some((addr("[::ffff:192.0.2.1]:5"), addr("192.0.2.9:80"))));
    assert_eq!(v, b"PROXY TCP4 192.0.2.1 192.0.2.9 5 80\r\n");
    let v = encode_v1(Some((addr("192.0.2.1:5"), addr("[2001:db8::1]:80"))));
    assert_eq!(v, b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 5 80\r\n");
    assert_eq!(encode_v1(None), b"PROXY UNKNOWN\r\n");
}

/// A strategy for socket addresses of one family.
fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<[u8; 4]>(),
            any::<u16>()
        )
            .prop_map(|(a, p, b, q)| (
                SocketAddr::new(IpAddr::from(a), p),
                SocketAddr::new(IpAddr::from(b), q)
            )),
        // IPv6 addresses that are not IPv4-mapped (those are sent as IPv4).
        (
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>()
        )
            .prop_filter("not v4-mapped", |(a, _, b, _)| {
                Ipv6Addr::from(*a).to_ipv4_mapped().is_none()
                    && Ipv6Addr::from(*b).to_ipv4_mapped().is_none()
            })
            .prop_map(|(a, p, b, q)| (
                SocketAddr::new(IpAddr::from(a), p),
                SocketAddr::new(IpAddr::from(b), q)
            )),
    ]
}

fn a_header() -> impl Strategy<Value = (Version, Option<(SocketAddr, SocketAddr)>)> {
    (
        prop_oneof![Just(Version::V1), Just(Version::V2)],
        proptest::option::weighted(0.8, addr_pair()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes: never a panic, and a complete header is never longer
    /// than the input or the cap.
    #[test]
    fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(Parsed::Complete { len, .. }) = parse(&buf) {
            prop_assert!(len <= buf.len() && len <= MAX_LEN);
        }
    }

    /// Arbitrary bytes after a valid signature, where parsing goes deepest.
    #[test]
    fn arbitrary_bytes_after_a_signature(
        v2 in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut buf = if v2 { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
        buf.extend_from_slice(&tail);
        match parse(&buf) {
            Ok(Parsed::Complete { len, .. }) => prop_assert!(len <= buf.len()),
            Ok(Parsed::Incomplete { total: Some(t) }) => prop_assert!(t > buf.len() && t <= MAX_LEN),
            _ => {}
        }
    }

    /// Every header round-trips, whatever follows it, and the length is
    /// exactly the header's: not a byte of what follows is claimed.
    #[test]
    fn round_trip_never_reads_past_the_header(
        (version, addresses) in a_header(),
        after in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let h = encode(version, addresses);
        let mut buf = h.clone();
        buf.extend_from_slice(&after);
        let (header, len) = complete(&buf);
        prop_assert_eq!(len, h.len());
        prop_assert_eq!(header.version, version);
        prop_assert_eq!(header.addresses, addresses);
    }

    /// Truncated at every offset, a header is incomplete, never an error and
    /// never complete; a known total is the real one.
    #[test]
    fn truncation_at_every_offset_is_incomplete((version, addresses) in a_header()) {
        let h = encode(version, addresses);
        for cut in 0..h.len() {
            match parse(&h[..cut]) {
                Ok(Parsed::Incomplete { total }) => {
                    prop_assert!(total.is_none() || total == Some(h.len()), "cut {}", cut);
                }
                other => prop_assert!(false, "cut {}: {:?}", cut, other),
            }
        }
    }

    /// Two headers back to back (v1 and v2 mixed): the first is parsed alone,
    /// then the second from exactly where the first ended.
    #[test]
    fn v1_and_v2_back_to_back((v1, a1) in a_header(), (v2, a2) in a_header()) {
        let first = encode(v1, a1);
        let second = encode(v2, a2);
        let mut buf = first.clone();
        buf.extend_from_slice(&second);
        let (h1, len1) = complete(&buf);
        prop_assert_eq!((h1.version, h1.addresses, len1), (v1, a1, first.len()));
        let (h2, len2) = complete(&buf[len1..]);
        prop_assert_eq!((h2.version, h2.addresses, len2), (v2, a2, second.len()));
    }

    /// A v2 header with arbitrary TLVs up to the cap parses; one byte of the
    /// announced block missing keeps it incomplete.
    #[test]
    fn v2_with_arbitrary_tlvs(
        addresses in addr_pair(),
        tlvs in proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..400)), 0..12),
    ) {
        let mut h = encode_v2(Some(addresses));
        let mut block_len = h.len() - 16;
        let mut count = 0;
        for (t, v) in &tlvs {
            if block_len + 3 + v.len() > V2_MAX_PAYLOAD {
                break;
            }
            h.push(*t);
            h.extend_from_slice(&(v.len() as u16).to_be_bytes());
            h.extend_from_slice(v);
            block_len += 3 + v.len();
            count += 1;
        }
        h[14..16].copy_from_slice(&(block_len as u16).to_be_bytes());
        let (header, len) = complete(&h);
        prop_assert_eq!((header.addresses, header.tlvs, len), (Some(addresses), count, h.len()));
        prop_assert_eq!(
            parse(&h[..h.len() - 1]),
            Ok(Parsed::Incomplete { total: Some(h.len()) })
        );
    }
}
