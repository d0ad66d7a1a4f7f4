"""Home Assistant Assist satellite over the ESPHome native API.

:mod:`.framing` (plaintext and noise frames), :mod:`.messages` (aioesphomeapi's
protobuf definitions), :mod:`.server` (the API server: connections, device
info, entities), :mod:`.satellite` (the voice logic), :mod:`.zeroconf`
(``_esphomelib._tcp`` advertisement). Importing the package imports nothing
heavy; aioesphomeapi is needed once the satellite starts.
"""
