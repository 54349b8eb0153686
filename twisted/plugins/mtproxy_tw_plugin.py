from twisted.application.service import ServiceMaker

mtproxy = ServiceMaker(
    "mtproxy-tw",
    "mtproxy_tw.tap",
    "A Telegram MTProto proxy (classic, dd and fake-TLS secrets).",
    "mtproxy",
)
