//! Feeds arbitrary bytes to the USB/IP parsers: URB headers (which must
//! round-trip), op headers, device lists and import messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2p_usb_agent::usbip::proto::{
    ImportReply, OpHeader, URB_HEADER_LEN, UrbHeader, decode_devlist, decode_import_request,
};

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.first_chunk::<URB_HEADER_LEN>()
        && let Ok(header) = UrbHeader::decode(bytes)
    {
        assert_eq!(UrbHeader::decode(&header.encode()), Ok(header));
    }
    let _ = OpHeader::decode(data.get(..8).unwrap_or(data));
    let _ = decode_devlist(data);
    let _ = decode_import_request(data.get(..32).unwrap_or(data));
    let _ = ImportReply::decode(data);
});
